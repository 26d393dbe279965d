"""Time per output token of cache presets against the exact cache at a long context, batch 1 and 8:
the figures of issue 16 (and the figure to compare two checkouts of kvsqueeze on one machine).

    PYTHONPATH=<checkout>/src python benchmarks/decode_step.py [--presets k4v4,best-4bit,...]
        [--context 4000] [--steps 16] [--repeats 3] [--threads 2] [--reference] [--text-file PATH]

The embedded SmolLM2-135M (float32) prefills the first ``--context`` tokens of WikiText-2 raw test
in chunks of 512, then decodes ``--steps`` greedy tokens at batch 1; the prefilled cache is then
repeated to batch 8 (``batch_repeat_interleave``) and decodes as many. Methods: the exact cache
(transformers' DynamicCache, sdpa) and each preset read by the fused path (attention "kvsqueeze";
``--reference``: the reference path, sdpa, where the preset allows it). Each repeat runs every
method once, in order, so drift hits them alike; medians over ``--repeats``. ``--threads`` torch
threads (the issue's figures: 2). Prints a table of ms per token and the ratio to the exact cache
against the issue's targets, and ends with one JSON line (per repeat and median, the key dot
product of the kernel, where kvsqueeze was imported from).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.config import preset
from kvsqueeze.eval.text import load_text, tokenize_text

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
DEFAULT_PRESETS = "k4v4,best-4bit,best-3bit,best-2bit,k2v2-keep10,h2o-50,snapkv-50"
EXACT = "exact"
# issue 16: fused time per token / exact time per token at 4k, (batch 1, batch 8); None: no target
TARGETS = {
    "k4v4": (0.55, 0.30),
    "best-4bit": (0.7, 0.45),
    "best-3bit": (0.7, 0.45),
    "best-2bit": (0.7, 0.45),
    "k2v2-keep10": (0.8, None),
    "h2o-50": (0.8, None),
    "snapkv-50": (0.8, None),
}


def decode_ms(model, cache, last: torch.Tensor, steps: int) -> float:
    """Milliseconds per greedy step of ``model`` over ``cache``, starting from tokens ``last`` (b, 1)."""
    with torch.no_grad():
        token = last
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
        return (time.perf_counter() - t0) / steps * 1000


def make_cache(name: str, model):
    from transformers import DynamicCache

    if name == EXACT:
        return DynamicCache(config=model.config)
    return SqueezedCache.from_model(model, name)


def run_method(name: str, model, ids: torch.Tensor, steps: int) -> tuple[float, float, str]:
    """(ms per token at batch 1, at batch 8, read path) of one method."""
    cache = make_cache(name, model)
    with torch.no_grad():
        for s in range(0, ids.shape[1], 512):
            logits = model(ids[:, s : s + 512], cache=cache, use_cache=True, logits_to_keep=1).logits
    last = logits[:, -1].argmax(-1, keepdim=True)
    wide = copy.deepcopy(cache)
    path = "exact" if name == EXACT else ("fused" if cache.fused else "reference")
    b1 = decode_ms(model, cache, last, steps)
    wide.batch_repeat_interleave(8)
    b8 = decode_ms(model, wide, last.repeat_interleave(8, dim=0), steps)
    return b1, b8, path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default=DEFAULT_PRESETS, help="comma-separated presets (exact is always run)"
    )
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="presets on the reference path (sdpa)")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    for name in names:
        preset(name)  # unknown names fail before any model loads
    sdpa, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa")
    fused = sdpa if args.reference else load_model("smollm2-135m", attn_implementation="kvsqueeze")[0]
    ids = tokenize_text(tokenizer, load_text(args.text_file))[: args.context][None]
    runs: dict[str, dict] = {n: {"b1": [], "b8": [], "path": None} for n in (EXACT, *names)}
    for r in range(args.repeats):
        for name in runs:
            needs_fused = preset(name).needs_attention if name != EXACT else False
            model = sdpa if name == EXACT or (args.reference and not needs_fused) else fused
            b1, b8, path = run_method(name, model, ids, args.steps)
            runs[name]["b1"].append(b1)
            runs[name]["b8"].append(b8)
            runs[name]["path"] = path
            print(
                f"repeat {r + 1}/{args.repeats} {name} ({path}): {b1:.1f} ms/token b1, {b8:.1f} ms/token b8",
                flush=True,
            )
    med = {n: (statistics.median(v["b1"]), statistics.median(v["b8"])) for n, v in runs.items()}
    exact_b1, exact_b8 = med[EXACT]
    print(
        f"\n{'method':14s} {'path':9s} {'ms/tok b1':>10s} {'ms/tok b8':>10s} {'b1/exact':>9s} {'target':>7s} {'b8/exact':>9s} {'target':>7s}"
    )
    rows = []
    for name, (b1, b8) in med.items():
        t1, t8 = TARGETS.get(name, (None, None))
        r1, r8 = b1 / exact_b1, b8 / exact_b8
        show = lambda t: "-" if t is None else f"<= {t}"  # noqa: E731
        print(
            f"{name:14s} {runs[name]['path']:9s} {b1:10.1f} {b8:10.1f} {r1:9.2f} {show(t1):>7s} {r8:9.2f} {show(t8):>7s}"
        )
        rows.append({
            "method": name, "path": runs[name]["path"], "ms_per_token_batch1": round(b1, 2),
            "ms_per_token_batch8": round(b8, 2), "batch1_vs_exact": round(r1, 3), "batch8_vs_exact": round(r8, 3),
            "target_batch1": t1, "target_batch8": t8,
            "runs_batch1": [round(x, 2) for x in runs[name]["b1"]], "runs_batch8": [round(x, 2) for x in runs[name]["b8"]],
        })  # fmt: skip
    from kvsqueeze.kernels import cpu

    print(
        json.dumps(
            {
                "benchmark": "decode_step",
                "context": args.context,
                "steps": args.steps,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "key_dot": cpu.key_dot() if cpu.available() else None,
                "rows": rows,
                "kvsqueeze": str(Path(kvsqueeze.__file__).parent),
            }
        )
    )


if __name__ == "__main__":
    main()
