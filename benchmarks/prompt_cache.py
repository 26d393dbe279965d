"""Prompt caches on disk (issue 15): load a saved prefill instead of recomputing it.

    python benchmarks/prompt_cache.py [--preset k4v4] [--tokens 4000] [--repeats 5] [--chunk 512]
        [--decode 32] [--attn fused|reference] [--text-file PATH] [--out PATH]

The embedded SmolLM2-135M (float32) reads the first ``--tokens`` tokens of WikiText-2 raw test.
Measured side by side in one run (medians of ``--repeats`` runs after one warm-up):

* **fresh**: build the cache, prefill the prompt (chunks of ``--chunk`` tokens), take the first
  token (argmax of the last logits);
* **load**: `load_prompt_cache` (read the file, check version, checksum, model and config, build
  the cache, copy the blocks in) and take the first token from the saved logits; once with the
  file in the page cache (just written) and once after dropping its pages
  (``posix_fadvise(DONTNEED)``, a read from the disk when the kernel honours it);
* **load + 1 step**: the same plus one decode forward (the second token), for what the first
  forward after a load costs;
* sizes: the file against the bytes the cache reports holding (`SqueezedCache.nbytes`: packed
  blocks with scales and zero points, exact sinks and window, block tables) and against an fp16
  cache of the same tokens;
* equality: the first ``--decode`` greedy tokens (and every step's logits, bit for bit) after
  loading against those after the fresh prefill.

Prints a table and ends with one JSON line (also saved under results/). Timings on a shared or
small machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.eval.capacity import KVShape
from kvsqueeze.eval.report import save_results
from kvsqueeze.eval.text import load_text, tokenize_text
from kvsqueeze.integrations.prompt_cache import load_prompt_cache, save_prompt_cache
from kvsqueeze.quant.exact import FP16

console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"


def fresh(model, preset: str, ids: torch.Tensor, chunk: int) -> tuple[SqueezedCache, torch.Tensor, int]:
    """A cache prefilled with ``ids`` (1, n), the last logits (1, 1, vocab) and the first token (the
    risk check is skipped, as the load skips it: neither side pays for it)."""
    cache = SqueezedCache.from_model(model, preset, risk_check=False)
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            logits = model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1).logits
    return cache, logits, int(logits[0, -1].argmax())


def drop_pages(path: Path) -> bool:
    """Ask the kernel to drop the file's cached pages (Linux); whether it could be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def greedy(model, cache: SqueezedCache, first: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits_seen = [first], []
    with torch.no_grad():
        for _ in range(steps - 1):
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache).logits
            logits_seen.append(logits)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens, logits_seen


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; every time; the last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--attn", choices=("fused", "reference"), default="fused")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=Path("results/prompt_cache.json"))
    args = parser.parse_args()
    model, tokenizer = load_model(
        "smollm2-135m", attn_implementation="kvsqueeze" if args.attn == "fused" else None
    )
    ids = tokenize_text(tokenizer, load_text(args.text_file))[: args.tokens][None]
    workdir = Path(tempfile.mkdtemp(prefix="kvsqueeze-prompt-cache-"))
    path = workdir / "prompt.safetensors"

    fresh_s, fresh_times, (cache, logits, first) = timed(
        lambda: fresh(model, args.preset, ids, args.chunk), args.repeats
    )
    save_s, save_times, size = timed(lambda: save_prompt_cache(path, cache, model, ids, logits), args.repeats)

    def load() -> tuple:
        loaded = load_prompt_cache(path, model, config=args.preset)
        return loaded, int(loaded.logits.argmax())

    def load_cold() -> tuple:
        drop_pages(path)
        return load()

    def load_step() -> None:
        loaded, token = load()
        with torch.no_grad():
            model(torch.tensor([[token]]), cache=loaded.cache)

    load_s, load_times, (loaded, loaded_first) = timed(load, args.repeats)
    cold_s, cold_times, _ = timed(load_cold, args.repeats)
    step_s, step_times, _ = timed(load_step, args.repeats)

    held = cache.nbytes()
    shape = KVShape.from_config(model.config)
    fp16 = FP16.kv_bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim) * ids.shape[1]
    want_tokens, want_logits = greedy(model, cache, first, args.decode)
    got_tokens, got_logits = greedy(model, loaded.cache, loaded_first, args.decode)
    same_tokens = want_tokens == got_tokens
    same_logits = all(torch.equal(a, b) for a, b in zip(want_logits, got_logits, strict=True))

    n = ids.shape[1]
    table = Table(
        title=f"prompt cache: {n} tokens, {args.preset}, {args.attn} path (median of {args.repeats})"
    )
    for col in ("what", "seconds", "vs fresh prefill"):
        table.add_column(col, justify="right")
    rows = [
        ("fresh prefill + first token", fresh_s),
        ("save the file", save_s),
        ("load (page cache) + first token", load_s),
        ("load (pages dropped) + first token", cold_s),
        ("load + first token + one decode step", step_s),
    ]
    for what, s in rows:
        table.add_row(what, f"{s:.4f}", f"{fresh_s / s:.1f}x faster" if what.startswith("load") else "")
    console.print(table)
    sizes = Table(title="sizes")
    for col in ("what", "bytes", "file / this"):
        sizes.add_column(col, justify="right")
    for what, b in (("file", size), ("cache holds (nbytes)", held), ("fp16 cache of the same tokens", fp16)):
        sizes.add_row(what, f"{b:,}", f"{size / b:.3f}")
    console.print(sizes)
    console.print(
        f"first {args.decode} greedy tokens after loading equal those after the fresh prefill: {same_tokens} "
        f"(every step's logits bit for bit: {same_logits})"
    )
    results = {
        "tokens": n,
        "fresh_prefill_first_token_s": fresh_s,
        "save_s": save_s,
        "load_first_token_s": load_s,
        "load_pages_dropped_first_token_s": cold_s,
        "load_first_token_one_step_s": step_s,
        "speedup": fresh_s / load_s,
        "speedup_pages_dropped": fresh_s / cold_s,
        "speedup_with_one_step": fresh_s / step_s,
        "file_bytes": size,
        "cache_bytes": held,
        "fp16_bytes": fp16,
        "file_over_cache_bytes": size / held,
        "file_over_fp16": size / fp16,
        "greedy_tokens_equal": same_tokens,
        "logits_bitwise_equal": same_logits,
        "times": {"fresh": fresh_times, "save": save_times, "load": load_times, "load_pages_dropped": cold_times,
                  "load_one_step": step_times},
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    config = vars(args) | {"text_file": str(args.text_file), "out": str(args.out)}
    save_results(args.out, config, results)
    path.unlink()
    workdir.rmdir()
    print(json.dumps({
        "speedup": round(fresh_s / load_s, 1), "speedup_pages_dropped": round(fresh_s / cold_s, 1),
        "file_over_cache_bytes": round(size / held, 4), "file_over_fp16": round(size / fp16, 4),
        "greedy_tokens_equal": same_tokens, "saved": str(args.out),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
