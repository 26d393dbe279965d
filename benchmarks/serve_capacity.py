"""Concurrent sequences a KV budget admits, per cache format (issue 14's capacity figure).

    python benchmarks/serve_capacity.py [--kv exact16,k4v4,int8] [--kv-budget 256MiB]
        [--requests 40] [--prompt-tokens 2000] [--output-tokens 48] [--text-file PATH]

For each format an `LLMEngine` over the embedded model gets ``--requests`` distinct prompts of
``--prompt-tokens`` tokens of WikiText-2 (consecutive slices) asking for ``--output-tokens`` greedy
tokens each (end of sequence ignored), under one ``--kv-budget``, and steps until they all finish
or ``--max-seconds`` pass. Reported: the most sequences running at once (admitted by the
scheduler: the budget holds their caches), the preemptions (0 = no preemption loop), the peak
measured KV bytes against the budget, and the bytes one 2,048-token sequence holds
(`LLMEngine.cost`). ``exact16`` is the exact cache stored in 16 bits (preset ``none`` with
``exact_dtype="float16"``), the fair baseline for a float32 model. Prints a table, saves JSON and
ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvsqueeze import load_model, preset
from kvsqueeze.engine import LLMEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
console = Console(stderr=True)


def kv_config(name: str):
    """A preset name, or ``exact16`` (the exact cache in 16 bits)."""
    if name == "exact16":
        return dataclasses.replace(preset("none"), exact_dtype="float16")
    return name


def run(model, tokenizer, name: str, ids: list[int], args: argparse.Namespace) -> dict:
    engine = LLMEngine(
        model, tokenizer, kv=kv_config(name), kv_budget=args.kv_budget, max_num_seqs=512,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )  # fmt: skip
    n = args.prompt_tokens
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    for i in range(args.requests):
        engine.add_request(f"r{i}", ids[i * n : (i + 1) * n], params)
    peak_running = peak_bytes = 0
    start = time.perf_counter()
    finished = 0
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{name}", total=args.requests)
        while engine.has_unfinished_requests() and time.perf_counter() - start < args.max_seconds:
            if args.stop_after_finished and finished >= args.stop_after_finished:
                break
            for out in engine.step():
                finished += out.finished
                bar.update(task, completed=finished)
            stats = engine.stats()
            peak_running = max(peak_running, stats.num_running)
            peak_bytes = max(peak_bytes, stats.kv_cache_bytes)
    stats = engine.stats()
    for rid in list(engine.sequences):  # stopped early: the rest give their blocks back
        engine.abort_request(rid)
    engine.step()
    return {
        "kv": name,
        "peak_running": peak_running,
        "preemptions": stats.num_preemptions,
        "finished": finished,
        "peak_kv_bytes": peak_bytes,
        "budget_bytes": engine.budget.limit,
        "bytes_per_sequence_2048": engine.cost(2048),
        "peak_bytes_per_sequence_2048": engine.peak(2048),
        "seconds": round(time.perf_counter() - start, 1),
        "leaked_blocks": engine.pool.num_used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv", default="exact16,k4v4,int8")
    parser.add_argument("--kv-budget", default="256MiB")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--output-tokens", type=int, default=48)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=4096, help="tokens per step (prefill chunks + decodes)"
    )
    parser.add_argument(
        "--stop-after-finished", type=int, default=0,
        help="stop once this many requests finished (0: run all); the peak is reached before the first finishes "
        "when the step admits whole prompts faster than requests complete",
    )  # fmt: skip
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_capacity.json")
    args = parser.parse_args()
    if not args.text_file.is_file():
        parser.error(f"--text-file: {args.text_file} does not exist; give the WikiText-2 raw test file")
    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    ids = tokenizer(args.text_file.read_text(encoding="utf-8")[: 60 * args.requests * args.prompt_tokens])[
        "input_ids"
    ]
    if len(ids) < args.requests * args.prompt_tokens:
        parser.error(f"--text-file: {len(ids)} tokens; need {args.requests * args.prompt_tokens}")
    rows = [run(model, tokenizer, name, ids, args) for name in args.kv.split(",")]
    base = next((r for r in rows if r["kv"] == "exact16"), rows[0])
    table = Table(
        title=f"Sequences admitted under a {args.kv_budget} KV budget ({args.prompt_tokens}+{args.output_tokens} tokens each)"
    )
    for col in (
        "kv",
        "peak running",
        "vs exact16",
        "preemptions",
        "peak KV bytes",
        "bytes / 2,048-token seq",
        "leaked blocks",
        "s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        r["ratio_to_exact16"] = round(r["peak_running"] / max(1, base["peak_running"]), 2)
        table.add_row(
            r["kv"], str(r["peak_running"]), f"{r['ratio_to_exact16']:.2f}x", str(r["preemptions"]),
            f"{r['peak_kv_bytes']:,}", f"{r['peak_bytes_per_sequence_2048']:,}", str(r["leaked_blocks"]),
            str(r["seconds"]),
        )  # fmt: skip
    Console().print(table)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"serve_capacity": {r["kv"]: r["peak_running"] for r in rows}}))


if __name__ == "__main__":
    main()
