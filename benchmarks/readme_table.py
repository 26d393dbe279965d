"""The README's results table, regenerated in one run on the embedded model.

    python benchmarks/readme_table.py            # or: make results
    python benchmarks/readme_table.py --methods exact,k4v4,k2v2 --no-write   # a subset, README untouched

One run, four parts, every method on the same tokens and prompts:
  quality   streamed perplexity vs the exact cache (2 windows x 2048 tokens of WikiText-2 test from
            the start of the file, prefill 256, chunks of 64): ΔPPL % ± err, KLD mean, top-1;
  retrieval passkey at 2048 tokens, depths 0.5 and 0.9, ``--seeds`` keys each (chat template);
  speed     ``kvsqueeze bench`` cell: 2048-token prompt, batch 1, 16 new tokens, median of 3
            (interleaved, no warm-up run); decode tokens/s of the reference path and, for kvsqueeze presets, the
            fused path (``<preset>@fused``);
  memory    KV bytes the cache holds after that prompt (measured from the cache), per token.
Writes docs/results.md (full tables, hardware, config) and replaces the README block between
``<!-- results:begin -->`` and ``<!-- results:end -->``; saves every number with its config in
results/readme_table.json; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from kvsqueeze.calibration.bundled import bundled_config
from kvsqueeze.config import CacheConfig
from kvsqueeze.eval.methods import method_available, resolve_method
from kvsqueeze.eval.perplexity import StreamSpec
from kvsqueeze.eval.quality import evaluate_quality, kv_elements_per_token
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.eval.retrieval import RetrievalSpec, evaluate_retrieval
from kvsqueeze.eval.speed import BenchConfig, run_grid
from kvsqueeze.eval.text import default_text_file, load_text, tokenize_text
from kvsqueeze.models import load_model

ROOT = Path(__file__).resolve().parent.parent
METHODS = "exact,int8,fp8,k4v4,k4v2,k2v2,best-4bit,best-3bit,best-2bit,quanto-int4"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FP16_BYTES = 2


def fused_name(name: str) -> str | None:
    """``name@fused`` for kvsqueeze configs the native kernels read (plain int/FP8 pages), else None."""
    method = resolve_method(name)
    if method.config.get("cache") or name.endswith("@fused"):
        return None
    return f"{name}@fused" if CacheConfig.from_dict(method.config).kernel_readable else None


def table_rows(
    quality: list[dict], retrieval: list[dict], speed: list[dict], fp16_per_token: int, bits: dict[str, float]
) -> list[dict]:
    by_speed = {r["method"]: r for r in speed}
    rows = []
    for q in quality:
        name = q["method"]
        cells = [r for r in retrieval if r["method"] == name]
        ref = by_speed.get(name)
        fused = by_speed.get(f"{name}@fused")
        per_token = ref["kv_bytes"] / ref["kv_tokens"] if ref else None
        rows.append(
            {
                "method": name,
                "bits_per_element": bits.get(name, q["bits_per_element"]),
                "kv_bytes_per_token": per_token,
                "kv_vs_fp16": per_token / fp16_per_token if per_token else None,
                "ppl": q["ppl"],
                "ppl_stderr": q["ppl_stderr"],
                "delta_ppl_pct": q["delta_ppl_pct"],
                "kld_mean": q["kld_mean"],
                "top1_agreement": q["top1_agreement"],
                "passkey_correct": sum(c["num_correct"] for c in cells),
                "passkey_trials": sum(c["num_trials"] for c in cells),
                "decode_tok_s": ref["decode_tokens_per_s"] if ref else None,
                "decode_tok_s_fused": fused["decode_tokens_per_s"] if fused else None,
            }
        )
    return rows


def _f(value: float | None, spec: str, dash: str = "–") -> str:
    return dash if value is None else format(value, spec)


def markdown(rows: list[dict], env: dict, num_scored: int, passkey_desc: str, command: str) -> str:
    lines = [
        f"Embedded SmolLM2-135M-Instruct (fp32 weights), {env['cpu']}, {env['cores']} cores, "
        f"torch {env['torch']}, transformers {env['transformers']}, git {env['git']}. "
        f"Regenerate with `{command}`; protocol in `docs/eval_protocol.md`.",
        "",
        "| method | bits/elem | KV B/token held at 2k (÷ fp16) | PPL ± err | ΔPPL % | KLD | top-1 | "
        f"passkey ({passkey_desc}) | decode tok/s (fused) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['method']}` | {r['bits_per_element']:.2f} | "
            f"{_f(r['kv_bytes_per_token'], ',.0f')} ({_f(r['kv_vs_fp16'], '.3f')}) | "
            f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | {r['delta_ppl_pct']:+.2f} | {_f(r['kld_mean'], '.4f')} | "
            f"{_f(r['top1_agreement'], '.3f')} | {r['passkey_correct']}/{r['passkey_trials']} | "
            f"{_f(r['decode_tok_s'], '.1f')} ({_f(r['decode_tok_s_fused'], '.1f')}) |"
        )
    lines += [
        "",
        f"PPL: streamed perplexity over {num_scored:,} scored tokens ± its standard error; ΔPPL: vs the "
        "exact cache on the same tokens (the paired difference is far tighter than the ± — see KLD). KV bytes: everything the cache holds after a 2048-token "
        "prompt + 16 tokens (sinks and residual window in float16 for this float32 model) ÷ tokens, and "
        "÷ an fp16 cache. Decode: batch 1, 2048-token context, median of 3; in parentheses the fused "
        'read path (`attn_implementation="kvsqueeze"`); "–": no fused path (transformers baselines; '
        "configs with codebooks, outliers, rotation or pre-RoPE keys, such as `best-*`, are read by the "
        "reference path, which also de-rotates and re-applies RoPE every step).",
    ]
    return "\n".join(lines)


def replace_block(path: Path, block: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=METHODS, help="comma-separated methods (exact is always added)")
    parser.add_argument("--text-file", default=None, help="default: the WikiText-2 test file beside the repo")
    parser.add_argument("--seeds", type=int, default=3, help="passkey keys per depth")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--out", default="results/readme_table.json")
    parser.add_argument("--no-write", dest="write", action="store_false", help="leave README/docs untouched")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    names = ["exact", *[n for n in names if n != "exact"]]
    methods = [resolve_method(n) for n in names]
    skipped = [m.name for m in methods if not method_available(m)[0]]
    methods = [m for m in methods if m.name not in skipped]
    for name in skipped:
        print(method_available(resolve_method(name))[1], file=sys.stderr)

    text_file = args.text_file or default_text_file()
    if text_file is None:
        raise SystemExit(
            "text_file: not given and the WikiText-2 test file is missing; pass --text-file PATH"
        )
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_text(tokenizer, load_text(text_file))

    stream = StreamSpec(window_tokens=2048, num_windows=2, prefill_tokens=256, chunk_tokens=64)
    quality = evaluate_quality(model, ids, methods, stream)
    passkey = RetrievalSpec(task="passkey", lengths=(2048,), depths=(0.5, 0.9), num_seeds=args.seeds)
    retrieval = evaluate_retrieval(model, tokenizer, methods, passkey)
    speed_names = [*(m.name for m in methods)]
    speed_names += [f for f in (fused_name(n) for n in speed_names) if f]
    bench = BenchConfig(
        model="smollm2-135m",
        methods=tuple(speed_names),
        contexts=(2048,),
        batch_sizes=(1,),
        new_tokens=16,
        repeats=3,
        warmup=0,
        text_file=str(text_file),
        threads=args.threads,
    )
    speed_methods = [resolve_method(n) for n in speed_names]
    speed = run_grid(bench, speed_methods, lambda _m: model, ids)

    env = environment()
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    bits = {  # best-* names resolve to the bundled calibration of the embedded model
        m.name: config.bits_per_element(num_layers=num_layers)
        for m in methods
        if (config := bundled_config(m.name, model.config)) is not None
    }
    rows = table_rows(quality, retrieval, speed, kv_elements_per_token(model.config) * FP16_BYTES, bits)
    command = "python benchmarks/readme_table.py"
    block = markdown(rows, env, stream.num_scored, f"2k, depths 0.5/0.9, {args.seeds} keys each", command)
    config = {
        "benchmark": "readme_table",
        "methods": [m.to_dict() for m in methods],
        "skipped": skipped,
        "stream": stream.__dict__,
        "retrieval": passkey.__dict__,
        "bench": bench.to_dict(),
        "text_file": str(text_file),
    }
    results = {
        "rows": rows,
        "quality": quality,
        "retrieval": retrieval,
        "speed": speed,
        "seconds": time.perf_counter() - started,
    }
    save_results(args.out, config, results)
    print(block)
    if args.write:
        replace_block(ROOT / "README.md", block)
        results_md = ROOT / "docs" / "results.md"
        results_md.write_text(
            "# Results\n\nGenerated by `python benchmarks/readme_table.py` "
            f"({results['seconds'] / 60:.1f} min). Raw numbers: `results/readme_table.json`.\n\n"
            f"{BEGIN}\n{block}\n{END}\n"
        )
    print(f"wall time {results['seconds'] / 60:.1f} min", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "readme_table",
                "config": config,
                "environment": env,
                "rows": rows,
                "seconds": results["seconds"],
            },
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
