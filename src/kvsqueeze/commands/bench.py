"""`kvsqueeze bench`: generation speed over methods x contexts x batch sizes, or capacity in a budget.

kvsqueeze bench --methods exact,k4v4,quanto-int4 --contexts 512,2048,4096 --batch-sizes 1,4
kvsqueeze bench --memory-budget 2GiB --methods exact,int8,k4v4,k2v2 --batch-sizes 1,16,64

Both print a table, save JSON with config and environment, and end with one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from .bench_view import capacity_table, plot_speed, speed_table
from .common import console, out

SPEED_BATCH_SIZES = "1,4"
CAPACITY_BATCH_SIZES = "1,16,64"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    bench = sub.add_parser("bench", help="speed (TTFT, time per token, tokens/s) and KV bytes, or capacity")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    bench.add_argument("--methods", default="exact,k4v4", help="exact, presets, quanto-int4, <config>.json")
    bench.add_argument("--contexts", default="512,2048,4096", help="prompt tokens, comma-separated")
    bench.add_argument(
        "--batch-sizes", help=f"default {SPEED_BATCH_SIZES} ({CAPACITY_BATCH_SIZES} for capacity)"
    )
    bench.add_argument("--new-tokens", type=int, default=16, help="generated tokens per run (TTFT + decode)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per cell; medians are reported")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs per method and batch size")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    bench.add_argument("--dtype", default="float32", help="model and K/V dtype: float32, bfloat16, float16")
    bench.add_argument(
        "--text-file", help="prompt text (default: the WikiText-2 test split, else random ids)"
    )
    bench.add_argument("--memory-budget", help="capacity report instead of speed, e.g. 2GiB, 512MiB, 1.5GB")
    bench.add_argument("--out", help="JSON results (default results/bench.json or results/capacity.json)")
    bench.add_argument("--plot", help="PNG figure of the speed grid (default: --out with .png)")
    bench.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench.set_defaults(func=run)


def parse_ints(text: str, field: str) -> tuple[int, ...]:
    """Positive integers from ``"512,2048"``; ValueError naming ``field`` otherwise."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{field}: {part!r} is not a positive integer; give e.g. 512,2048")
        values.append(int(part))
    return tuple(values)


def resolve_available(names: str) -> tuple[list, list[str]]:
    """(methods by name, names skipped): ValueError naming --methods when unknown; baselines whose
    optional package is missing are skipped with a message."""
    from ..eval.methods import baseline_available, resolve_methods

    try:
        methods = resolve_methods(names)
    except ValueError as err:
        raise ValueError(f"--methods: {err}") from err
    kept, skipped = [], []
    for method in methods:
        is_baseline = method.config.get("cache") == "QuantizedCache"
        ok, why = baseline_available(method.name) if is_baseline else (True, "")
        if ok:
            kept.append(method)
        else:
            skipped.append(method.name)
            console.print(f"[yellow]{why}[/yellow]")
    if not kept:
        raise ValueError(f"--methods: none of {names!r} can run here (see the messages above)")
    return kept, skipped


def run(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from ..models import resolve_model

    capacity = args.memory_budget is not None
    default_batches = CAPACITY_BATCH_SIZES if capacity else SPEED_BATCH_SIZES
    batch_sizes = parse_ints(args.batch_sizes or default_batches, "--batch-sizes")
    methods, skipped = resolve_available(args.methods)
    model_config = AutoConfig.from_pretrained(resolve_model(args.model))
    if capacity:
        run_capacity(args, methods, batch_sizes, model_config, skipped)
    else:
        run_speed(args, methods, batch_sizes, model_config, skipped)


def run_speed(
    args: argparse.Namespace, methods: list, batch_sizes: tuple[int, ...], model_config: Any, skipped: list
) -> None:
    from transformers import AutoTokenizer

    from ..eval.report import save_results
    from ..eval.speed import BenchConfig, model_loader, run_grid
    from ..eval.text import default_text_file, load_text, tokenize_text
    from ..models import resolve_model

    text_file = args.text_file or default_text_file()
    config = BenchConfig(
        args.model,
        tuple(m.name for m in methods),
        parse_ints(args.contexts, "--contexts"),
        batch_sizes,
        args.new_tokens,
        args.repeats,
        args.warmup,
        args.dtype,
        None if text_file is None else str(text_file),
        threads=args.threads,
    )
    from ..integrations.context import context_limit

    limit = context_limit(model_config.get_text_config(decoder=True))
    config.check_context(limit.tokens, limit.source)
    set_threads(config.threads)
    ids = None
    if text_file is not None:
        ids = tokenize_text(AutoTokenizer.from_pretrained(resolve_model(args.model)), load_text(text_file))
    path = Path(args.out or "results/bench.json")
    extra = {"load_average_before": os.getloadavg(), "skipped_methods": skipped}

    def save_partial(rows: list[dict]) -> None:  # an interrupted grid keeps its finished cells
        save_results(path, {**config.to_dict(), "mode": "speed"}, {"rows": rows, "complete": False, **extra})

    rows = run_grid(config, methods, model_loader(args.model, args.dtype), ids, args.progress, save_partial)
    extra["load_average_after"] = os.getloadavg()
    wide().print(speed_table(rows, config))
    console.print(
        "TTFT = prefill of the prompt (1st token); TPOT = mean decode step; medians of the runs; spread = "
        "(max - min) / median of TPOT. KV = bytes the cache holds after the run (nbytes() or tensor walk). "
        f"peak RSS + = process resident high-water growth during the run ({rows[0]['memory_source']})."
    )
    save(path, {**config.to_dict(), "mode": "speed"}, {"rows": rows, "complete": True, **extra})
    plot_speed(
        rows, Path(args.plot) if args.plot else path.with_suffix(".png"), f"{args.model} ({args.dtype})"
    )


def run_capacity(
    args: argparse.Namespace, methods: list, batch_sizes: tuple[int, ...], model_config: Any, skipped: list
) -> None:
    from tqdm.auto import tqdm

    from ..eval.capacity import capacity_row, parse_size
    from ..eval.speed import DTYPES

    budget = parse_size(args.memory_budget)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: {args.dtype!r} is not supported; allowed: {list(DTYPES)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: {args.threads} must be an integer >= 1 (omit it for torch's default)")
    set_threads(args.threads)
    rows = []
    cells = [(m, b) for m in methods for b in batch_sizes]
    for method, batch in tqdm(cells, desc="capacity", disable=not args.progress):
        rows.append(capacity_row(method, model_config, budget, batch, DTYPES[args.dtype]))
        if "skipped" in rows[-1] and batch == batch_sizes[0]:
            console.print(f"[yellow]{method.name}: skipped, {rows[-1]['skipped']}[/yellow]")
    wide().print(capacity_table(rows, args.memory_budget, args.model, args.dtype))
    config = {"mode": "capacity", "model": args.model, "methods": [m.name for m in methods]}
    config.update(memory_budget=args.memory_budget, budget_bytes=budget, batch_sizes=batch_sizes)
    config.update(dtype=args.dtype, threads=args.threads)
    save(Path(args.out or "results/capacity.json"), config, {"rows": rows, "skipped_methods": skipped})


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads for this command (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def wide() -> Console:
    """The stdout console; when it is not a terminal, one 160 columns wide so tables are not squeezed."""
    return out if out.is_terminal else Console(width=160)


def save(path: Path, config: dict, results: dict) -> None:
    from ..eval.report import environment, save_results

    save_results(path, config, results)
    console.print(f"wrote {path}")
    print(
        json.dumps(
            {"benchmark": "kvsqueeze bench", "config": config, "environment": environment(), **results}
        )
    )
