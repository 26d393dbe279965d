"""Issue-2 figures on the embedded model and WikiText-2: memory, streamed perplexity, decode speed.

    python benchmarks/core_figures.py [--parts memory,quality,speed] [--repeats 3]

Memory: 4096 tokens through each cache; everything it holds (sinks, residual, packed pages,
scales) as a fraction of an fp16 cache (23,040 B/token for this model).
Quality: 2 windows x 2048 tokens, fresh cache per window, prefill 256 then chunks of 64, every
token scored; change vs the exact cache, KLD and top-1 agreement, beside transformers'
QuantizedCache (quanto, group 64, residual 128) at the same bits.
Speed: 4000-token prompt then 64 greedy tokens; time per output token, median of N runs.
Prints tables and ends with one JSON line (also saved under results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, QuantizedCache

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.eval.generation import greedy_decode
from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.eval.perplexity import StreamSpec, streamed_perplexity
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.eval.text import default_text_file, load_text, tokenize_text

FP16_BYTES_PER_TOKEN = 23_040
MEMORY_PRESETS = ("int8", "fp8", "k4v4", "k4v2", "k2v2")
QUALITY_PRESETS = ("int8", "fp8", "k4v4", "k4v2", "k2v2")
QUANTO = {"quanto-int4": 4, "quanto-int2": 2}
console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in logs


def exact_cache(model):
    return DynamicCache(config=model.config)


def quanto_cache(bits: int):
    return lambda model: QuantizedCache(
        "quanto", model.config, nbits=bits, q_group_size=64, residual_length=128
    )


def squeezed(name: str):
    return lambda model: SqueezedCache.from_model(model, name)


def held_tensor_bytes(cache: SqueezedCache) -> int:
    """Walk every tensor reachable from the layers' stores (independent of the nbytes bookkeeping)."""
    return store_tensor_bytes(layer.store for layer in cache.layers)


def run_memory(model, ids: torch.Tensor) -> list[dict]:
    rows = []
    tokens = ids[:4096].unsqueeze(0)
    for name in MEMORY_PRESETS:
        cache = SqueezedCache.from_model(model, name)
        with torch.inference_mode():
            for start in range(0, tokens.shape[1], 1024):
                model(tokens[:, start : start + 1024], cache=cache, use_cache=True, logits_to_keep=1)
        report = cache.memory_report()
        walked = held_tensor_bytes(cache)
        fraction = cache.nbytes() / (FP16_BYTES_PER_TOKEN * tokens.shape[1])
        rows.append(
            {
                "preset": name,
                "tokens": report.num_tokens,
                "nbytes": cache.nbytes(),
                "walked_bytes": walked,
                "fraction_of_fp16": fraction,
                "parts": report.parts,
            }
        )
        console.print(f"memory {name}: {fraction:.4f} of fp16 (nbytes {cache.nbytes():,}, walked {walked:,})")
    return rows


def run_quality(model, ids: torch.Tensor) -> list[dict]:
    spec = StreamSpec(window_tokens=2048, num_windows=2, prefill_tokens=256, chunk_tokens=64)
    exact = streamed_perplexity(model, ids, exact_cache, spec)
    rows = [{"method": "exact (DynamicCache)", **exact.to_dict(), "delta_pct": 0.0}]
    methods = [(p, squeezed(p)) for p in QUALITY_PRESETS] + [(q, quanto_cache(b)) for q, b in QUANTO.items()]
    for name, factory in methods:
        res = streamed_perplexity(model, ids, factory, spec, reference=exact_cache)
        delta = 100 * (res.ppl / exact.ppl - 1)
        rows.append({"method": name, **res.to_dict(), "delta_pct": delta})
        console.print(f"quality {name}: ppl {res.ppl:.4f} ({delta:+.3f} %), KLD {res.kld_mean:.5f}")
    return rows


def run_speed(model, ids: torch.Tensor, repeats: int) -> list[dict]:
    prompt = ids[:4000].unsqueeze(0)
    methods = [
        ("exact (DynamicCache)", exact_cache),
        ("k4v4", squeezed("k4v4")),
        ("quanto-int4", quanto_cache(4)),
        ("int8", squeezed("int8")),
        ("k2v2", squeezed("k2v2")),
    ]
    greedy_decode(model, prompt[:, :512], exact_cache(model), 4)  # warm-up
    for _, factory in methods:
        greedy_decode(model, prompt[:, :512], factory(model), 4)
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    prefill: dict[str, list[float]] = {name: [] for name, _ in methods}
    for r in range(repeats):
        for name, factory in methods:  # interleaved, so drift hits every method alike
            run = greedy_decode(model, prompt, factory(model), 64)
            times[name].append(run.seconds_per_token)
            prefill[name].append(run.prefill_seconds)
            console.print(f"speed run {r + 1}/{repeats} {name}: {1000 * run.seconds_per_token:.1f} ms/token")
    base = statistics.median(times["exact (DynamicCache)"])
    return [
        {
            "method": name,
            "tpot_ms_median": 1000 * statistics.median(t),
            "tpot_ms_runs": [1000 * x for x in t],
            "ratio_to_exact": statistics.median(t) / base,
            "prefill_s_median": statistics.median(prefill[name]),
        }
        for name, t in times.items()
    ]


def print_tables(results: dict) -> None:
    if "memory" in results:
        t = Table(title="Memory after 4096 tokens (fraction of an fp16 cache, everything held)")
        for c in ("preset", "fraction", "nbytes", "walked tensors"):
            t.add_column(c, justify="right")
        for r in results["memory"]:
            t.add_row(
                r["preset"], f"{r['fraction_of_fp16']:.4f}", f"{r['nbytes']:,}", f"{r['walked_bytes']:,}"
            )
        console.print(t)
    if "quality" in results:
        t = Table(title="Streamed perplexity, WikiText-2 (2 x 2048, prefill 256, chunks 64)")
        for c in ("method", "ppl", "± err", "Δ %", "KLD mean", "KLD p99", "top-1", "scored"):
            t.add_column(c, justify="right")
        for r in results["quality"]:
            t.add_row(
                r["method"],
                f"{r['ppl']:.4f}",
                f"{r['ppl_stderr']:.3f}",
                f"{r['delta_pct']:+.3f}",
                "-" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}",
                "-" if r.get("kld_p99") is None else f"{r['kld_p99']:.4f}",
                "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.4f}",
                str(r["num_scored"]),
            )
        console.print(t)
    if "speed" in results:
        t = Table(title="Decode after a 4000-token prompt (64 greedy tokens, median)")
        for c in ("method", "ms/token", "vs exact", "runs (ms)", "prefill s"):
            t.add_column(c, justify="right")
        for r in results["speed"]:
            runs = ", ".join(f"{x:.1f}" for x in r["tpot_ms_runs"])
            t.add_row(
                r["method"],
                f"{r['tpot_ms_median']:.1f}",
                f"{r['ratio_to_exact']:.3f}",
                runs,
                f"{r['prefill_s_median']:.2f}",
            )
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="memory,quality,speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-file", default=None, help="default: ../shared/data/wikitext-2-raw-test.txt")
    parser.add_argument("--out", default="results/core_figures.json")
    args = parser.parse_args(argv)
    text_file = args.text_file or default_text_file()
    if text_file is None:
        raise SystemExit("text_file: no default text found; pass --text-file PATH")
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_text(tokenizer, load_text(text_file))
    parts = args.parts.split(",")
    results: dict = {}
    if "memory" in parts:
        results["memory"] = run_memory(model, ids)
    if "quality" in parts:
        results["quality"] = run_quality(model, ids)
    if "speed" in parts:
        results["speed"] = run_speed(model, ids, args.repeats)
    print_tables(results)
    config = {"model": "smollm2-135m", "text_file": str(text_file), "parts": parts, "repeats": args.repeats}
    save_results(args.out, config, results)
    print(
        json.dumps({"benchmark": "core_figures", "config": config, "environment": environment(), **results})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
