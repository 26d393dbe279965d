"""`kvsqueeze bench`: generation speed over methods x contexts x batch sizes, or capacity in a budget.

kvsqueeze bench --methods exact,k4v4,quanto-int4 --contexts 512,2048,4096 --batch-sizes 1,4
kvsqueeze bench --memory-budget 2GiB --methods exact,int8,k4v4,k2v2 --batch-sizes 1,16,64
kvsqueeze bench --methods exact,k4v2 --kv k4v2 --kv-values int4:g32   # adds k4v2+values=int4:g32

Every flag is checked before the model loads or anything is measured (output paths included, and
config files' model fingerprints); the flags of the speed grid are refused with ``--memory-budget``.
A grid whose largest run, or a budget whose caches, cannot fit in the memory available here is
refused up front with the largest value that fits (`resources`); memory running out during a run
ends it with a message (`common.RunFailed`, exit code 1), the finished cells saved. Both modes print
a table, save the JSON results (config, environment, every run, the config each method ran with) to
``--out`` and end with one short JSON line on stdout: config, environment and the path of the results.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .bench_view import capacity_table, plot_speed, print_fitted, speed_table
from .common import RunFailed, check_output_path, console, load_model_config, read_text_file
from .kv_args import DEFAULT_KV, KVChoice, ResolvedKV, add_kv_arguments
from .options import check_methods, parse_numbers, runnable_methods, split_list
from .resources import check_capacity_memory, check_speed_memory, is_out_of_memory

SPEED_BATCH_SIZES = "1,4"
CAPACITY_BATCH_SIZES = "1,16,64"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # eval.speed.DTYPES, named without importing torch
# the flags of the speed grid, with their defaults: refused in capacity mode (--memory-budget)
SPEED_ONLY = {
    "contexts": ("--contexts", "512,2048,4096"),
    "new_tokens": ("--new-tokens", 16),
    "repeats": ("--repeats", 3),
    "warmup": ("--warmup", 1),
    "text_file": ("--text-file", None),
    "plot": ("--plot", None),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    bench = sub.add_parser(
        "bench",
        help="speed (TTFT, time per token, tokens/s) and KV bytes, or capacity",
        description="Speed grid (methods x contexts x batch sizes), or with --memory-budget the longest "
        "context each method's KV cache fits in.",
    )
    bench.add_argument(
        "--model", default=DEFAULT_MODEL, help="named model, local folder or hub id (default: %(default)s)"
    )
    bench.add_argument(
        "--methods",
        default="exact,k4v4",
        help="comma-separated: exact, presets, <preset>@fused, quanto-int4, hqq-int<bits>, <config>.json "
        "(default: %(default)s)",
    )
    add_kv_arguments(
        bench,
        kv_default=None,
        kv_help="base preset or config JSON of one more method, built by --kv-keys, --kv-values and --evict "
        f"and added to --methods; only with them (default: {DEFAULT_KV})",
    )
    bench.add_argument(
        "--contexts",
        help="prompt tokens, comma-separated positive integers; speed only (default: 512,2048,4096)",
    )
    bench.add_argument(
        "--new-tokens",
        type=int,
        help="generated tokens per run (TTFT + decode), >= 2; speed only (default: 16)",
    )
    bench.add_argument(
        "--repeats", type=int, help="timed runs per cell, >= 1; medians are reported; speed only (default: 3)"
    )
    bench.add_argument(
        "--warmup", type=int, help="untimed runs per method and batch size, >= 0; speed only (default: 1)"
    )
    bench.add_argument(
        "--batch-sizes",
        help=f"comma-separated positive integers (default: {SPEED_BATCH_SIZES}, or {CAPACITY_BATCH_SIZES} "
        "with --memory-budget)",
    )
    bench.add_argument("--threads", type=int, help="torch threads, >= 1 (default: torch's, one per core)")
    bench.add_argument(
        "--dtype", default="float32", choices=DTYPE_NAMES, help="model and K/V dtype (default: %(default)s)"
    )
    bench.add_argument(
        "--text-file",
        metavar="PATH",
        help="UTF-8 prompt text, at least as many tokens as the longest context; speed only (default: the "
        "WikiText-2 test split, else random token ids)",
    )
    bench.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="capacity report instead of speed, e.g. 2GiB, 512MiB, 1.5GB (default: the speed grid)",
    )
    bench.add_argument(
        "--out",
        metavar="PATH",
        help="JSON results (default: results/bench.json, or results/capacity.json with --memory-budget)",
    )
    bench.add_argument(
        "--plot", metavar="PATH", help="PNG figure of the speed grid; speed only (default: --out with .png)"
    )
    bench.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: a bar when stderr is a terminal, none in logs and pipes)",
    )
    bench.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags that do not apply to the mode and numbers out of range."""
    if args.memory_budget is not None:
        unused = [flag for name, (flag, _) in SPEED_ONLY.items() if getattr(args, name) is not None]
        if unused:
            raise ValueError(
                f"--memory-budget: the capacity report does not use {', '.join(unused)} (flags of the speed "
                "grid); drop them, or drop --memory-budget to measure speed"
            )
    for name, (_, default) in SPEED_ONLY.items():  # the speed grid's defaults, once known not given
        if getattr(args, name) is None:
            setattr(args, name, default)
    for flag, value, low in (
        ("--new-tokens", args.new_tokens, 2),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < low:
            raise ValueError(f"{flag}: {value} must be an integer >= {low}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: {args.threads} must be an integer >= 1 (omit it for torch's default)")


def kv_choice(args: argparse.Namespace) -> KVChoice | None:
    """The extra method of --kv with --kv-keys/--kv-values/--evict, or None; --kv alone is refused."""
    choice = KVChoice.from_args(args)
    if not choice.modified:
        if args.kv is not None:
            raise ValueError(
                f"--kv: {args.kv!r} alone adds no method to bench; list presets in --methods, or add "
                "--kv-keys, --kv-values or --evict to build one from it"
            )
        if args.evict_scorer is not None:
            choice.check()  # says: add --evict
        return None
    choice.check()
    return choice


def custom_method(label: str, kv: ResolvedKV) -> Any:
    """The `Method` of the config built by the KV flags (fused read path when it scores by attention)."""
    from ..eval.methods import Method
    from .generate import read_path

    fused = read_path(kv.config, None, label) == "fused"

    def make(model: Any) -> Any:
        from ..integrations.attention import use_fused_attention
        from ..integrations.cache import SqueezedCache

        if fused:
            use_fused_attention(model)
        return SqueezedCache.from_model(model, kv.config, fused=fused)

    return Method(label, make, kv.config.to_dict(), kv.config.bits_per_element())


def ran_configs(methods: list, model_config: Any) -> dict[str, dict]:
    """The config each method ran with on this model: a preset name as the cache resolves it (fitted
    to the head_dim; ``best-*`` as its bundled calibration when one matches)."""
    from ..config import PRESETS, TOKEN_PRESETS
    from ..eval.methods import FUSED_SUFFIX

    out = {}
    for method in methods:
        base = method.name.removesuffix(FUSED_SUFFIX)
        if "cache" not in method.config and (base in PRESETS or base in TOKEN_PRESETS):
            out[method.name] = KVChoice(base).resolve(model_config).config.to_dict()
        else:
            out[method.name] = method.config
    return out


def run(args: argparse.Namespace) -> None:
    from ..eval.capacity import parse_size

    capacity = args.memory_budget is not None
    check_flags(args)
    budget = parse_size(args.memory_budget) if capacity else None
    default_batches = CAPACITY_BATCH_SIZES if capacity else SPEED_BATCH_SIZES
    # an empty --batch-sizes is refused, not replaced by the default
    batches = default_batches if args.batch_sizes is None else args.batch_sizes
    batch_sizes = parse_numbers("--batch-sizes", batches, default_batches)
    contexts = None if capacity else parse_numbers("--contexts", args.contexts, "512,2048")
    choice = kv_choice(args)
    out = check_output_path("--out", args.out or f"results/{'capacity' if capacity else 'bench'}.json")
    plot = None if capacity else check_output_path("--plot", args.plot or out.with_suffix(".png"))
    text = None if args.text_file is None else read_text_file("--text-file", args.text_file)
    named = split_list(args.methods)
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:  # as BenchConfig says it
        raise ValueError(
            f"--methods: {repeated} given more than once; give each method once, e.g. exact,k4v4"
        )
    methods, skipped = runnable_methods("--methods", args.methods)
    model_config = load_model_config("--model", args.model)
    check_methods("--methods", methods, model_config, args.methods, args.model)
    if choice is not None:
        extra = custom_method(choice.label, choice.resolve(model_config, args.model))
        if extra.name in [m.name for m in methods]:
            raise ValueError(f"--methods: {extra.name!r} given twice (also built by the --kv flags)")
        methods.append(extra)
    configs = ran_configs(methods, model_config)
    if capacity:
        check_capacity_memory(methods, model_config, args.dtype, batch_sizes, budget, args.memory_budget)
        run_capacity(args, methods, batch_sizes, model_config, skipped, budget, out, configs)
    else:
        run_speed(args, methods, batch_sizes, contexts, model_config, skipped, text, out, plot, configs)


def run_speed(
    args: argparse.Namespace,
    methods: list,
    batch_sizes: tuple[int, ...],
    contexts: tuple[int, ...],
    model_config: Any,
    skipped: list,
    text: str | None,
    path: Path,
    plot: Path,
    configs: dict,
) -> None:
    from transformers import AutoTokenizer

    from ..eval.report import save_results
    from ..eval.speed import BenchConfig, model_loader, run_grid
    from ..eval.text import default_text_file, load_text, tokenize_text
    from ..integrations.context import context_limit
    from ..models import resolve_model

    text_file = args.text_file or default_text_file()
    config = BenchConfig(
        args.model,
        tuple(m.name for m in methods),
        contexts,
        batch_sizes,
        args.new_tokens,
        args.repeats,
        args.warmup,
        args.dtype,
        None if text_file is None else str(text_file),
        threads=args.threads,
    )
    limit = context_limit(model_config.get_text_config(decoder=True))
    config.check_context(limit.tokens, limit.source)
    check_speed_memory(methods, model_config, args.dtype, batch_sizes, contexts, args.new_tokens)
    ids = None
    if text_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
        ids = tokenize_text(tokenizer, text if text is not None else load_text(text_file))
        if len(ids) < max(contexts):
            if args.text_file is not None:
                raise ValueError(
                    f"--text-file: {args.text_file!r} holds {len(ids)} tokens, fewer than the context "
                    f"{max(contexts)} of --contexts; allowed: a text of at least {max(contexts)} tokens, or "
                    "smaller --contexts"
                )
            console.print(f"{text_file} holds {len(ids)} tokens: longer contexts use random token ids")
    else:
        console.print("no text file (WikiText-2 not found): the prompts are random token ids")
    set_threads(config.threads)
    extra = {"load_average_before": os.getloadavg(), "skipped_methods": skipped, "method_configs": configs}

    finished: list[dict] = []

    def save_partial(rows: list[dict]) -> None:  # an interrupted grid keeps its finished cells
        finished[:] = rows
        save_results(path, {**config.to_dict(), "mode": "speed"}, {"rows": rows, "complete": False, **extra})

    try:
        rows = run_grid(
            config, methods, model_loader(args.model, args.dtype), ids, args.progress, save_partial
        )
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise RunFailed(out_of_memory_message(err, config, len(finished) // len(methods), path)) from None
    extra["load_average_after"] = os.getloadavg()
    print_fitted(speed_table(rows, config))
    console.print(
        "TTFT = prefill of the prompt (1st token); TPOT = mean decode step; medians of the runs; spread = "
        "(max - min) / median of TPOT. KV = bytes the cache holds after the run (nbytes() or tensor walk). "
        f"RSS + = process resident high-water growth during the run ({rows[0]['memory_source']})."
    )
    save(path, {**config.to_dict(), "mode": "speed"}, {"rows": rows, "complete": True, **extra})
    plot_speed(rows, plot, f"{args.model} ({args.dtype})")


def run_capacity(
    args: argparse.Namespace,
    methods: list,
    batch_sizes: tuple[int, ...],
    model_config: Any,
    skipped: list,
    budget: int,
    path: Path,
    configs: dict,
) -> None:
    from tqdm.auto import tqdm

    from ..eval.capacity import capacity_row
    from ..eval.progress import bar_disabled
    from ..eval.speed import DTYPES

    set_threads(args.threads)
    rows = []
    cells = [(m, b) for m in methods for b in batch_sizes]
    for method, batch in tqdm(cells, desc="capacity", disable=bar_disabled(args.progress)):
        try:
            rows.append(capacity_row(method, model_config, budget, batch, DTYPES[args.dtype]))
        except (MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            raise RunFailed(
                f"--memory-budget: memory ran out filling {method.name} at batch size {batch} up to "
                f"{args.memory_budget} ({(str(err).strip().splitlines() or [''])[0][:200]}); allowed: a smaller "
                "--memory-budget"
            ) from None
        if "skipped" in rows[-1] and batch == batch_sizes[0]:
            console.print(f"[yellow]{method.name}: skipped, {rows[-1]['skipped']}[/yellow]")
    print_fitted(capacity_table(rows, args.memory_budget, args.model, args.dtype))
    config = {"mode": "capacity", "model": args.model, "methods": [m.name for m in methods]}
    config.update(memory_budget=args.memory_budget, budget_bytes=budget, batch_sizes=batch_sizes)
    config.update(dtype=args.dtype, threads=args.threads)
    save(path, config, {"rows": rows, "skipped_methods": skipped, "method_configs": configs})


def out_of_memory_message(err: BaseException, config: Any, cells_done: int, path: Path) -> str:
    """What to say when memory ran out in the speed grid after ``cells_done`` finished cells (the
    grid runs batch sizes outermost, contexts within): the cell, what failed, what was saved."""
    cells = [(b, c) for b in config.batch_sizes for c in config.contexts]
    batch, context = cells[min(cells_done, len(cells) - 1)]
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    saved = f"the {cells_done} finished cells are saved in {path}" if cells_done else "no cell finished"
    return (
        f"--batch-sizes/--contexts: memory ran out at batch size {batch}, context {context} ({reason}); "
        f"{saved}; allowed: a smaller --batch-sizes or --contexts (or fewer --threads, another --dtype)"
    )


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads for this command (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def save(path: Path, config: dict, results: dict) -> None:
    """Save the results to ``path``, say so, and end stdout with one short JSON line (no rows)."""
    from ..eval.report import environment, save_results

    save_results(path, config, results)
    console.print(f"saved to {path}")
    line = {
        "benchmark": "kvsqueeze bench",
        "saved": str(path),
        "config": config,
        "environment": environment(),
    }
    print(json.dumps(line, default=str))
