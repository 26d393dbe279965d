"""`kvsqueeze eval quality|retrieval`: quality and retrieval of cache methods against the exact cache.

kvsqueeze eval quality --methods exact,int8,k4v4,k2v2,quanto-int4 --window 2048 --windows 2
kvsqueeze eval retrieval --methods exact,k4v4,k2v2 --lengths 2048 --depths 0.1,0.5,0.9 --seeds 10

Each prints a table, saves its rows with their config and environment as JSON (``--out``) and draws a
PNG (``--plot``; skipped when matplotlib is missing). The numbers are defined in docs/eval_protocol.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from .common import console, out

TABLE_WIDTH = 120
"""Width of the tables when stdout is not a terminal (files, pipes), so that no cell wraps."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    parser = sub.add_parser("eval", help="quality (perplexity, KLD) and retrieval of cache methods")
    tasks = parser.add_subparsers(dest="eval_command", required=True)

    quality = tasks.add_parser("quality", help="streamed perplexity, ΔPPL, KLD and top-1 vs the exact cache")
    quality.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    quality.add_argument("--methods", default="exact,int8,k4v4,k2v2,quanto-int4")
    _add_text_arguments(quality)
    quality.add_argument("--window", type=int, default=2048, help="tokens per window (fresh cache each)")
    quality.add_argument("--windows", type=int, default=2, help="number of consecutive windows")
    quality.add_argument("--prefill", type=int, default=256, help="tokens of the first forward per window")
    quality.add_argument("--chunk", type=int, default=64, help="tokens per forward after the prefill")
    quality.add_argument("--second-half", action="store_true", help="score only each window's second half")
    quality.add_argument("--out", default="results/quality.json", help="JSON file of config and results")
    quality.add_argument("--plot", default="results/quality.png", help="PNG of ΔPPL and KLD vs bits")
    quality.set_defaults(func=run_quality)

    retrieval = tasks.add_parser("retrieval", help="passkey / needle-in-a-haystack retrieval accuracy")
    retrieval.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    retrieval.add_argument("--methods", default="exact,k4v4,k2v2")
    retrieval.add_argument("--task", choices=("passkey", "needle"), default="passkey")
    retrieval.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens, comma-separated")
    retrieval.add_argument("--depths", default="0.1,0.5,0.9", help="key depths in [0, 1], comma-separated")
    retrieval.add_argument("--seeds", type=int, default=10, help="trials per (length, depth)")
    retrieval.add_argument("--new-tokens", type=int, default=12, help="greedy tokens of the answer")
    retrieval.add_argument("--chunk", type=int, default=256, help="prefill chunk size in tokens")
    _add_text_arguments(retrieval, help_suffix=" (needle task)")
    retrieval.add_argument("--out", default="results/retrieval.json", help="JSON file of config and results")
    retrieval.add_argument("--plot", default="results/retrieval.png", help="PNG, one heat map per method")
    retrieval.set_defaults(func=run_retrieval)


def _add_text_arguments(parser: argparse.ArgumentParser, help_suffix: str = "") -> None:
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--text-file", help=f"UTF-8 text; default: the bundled WikiText-2 test split{help_suffix}"
    )
    text.add_argument("--hub-wikitext", action="store_true", help="download WikiText-2 with `datasets`")


def _read_text(args: argparse.Namespace) -> tuple[str, str]:
    """``(text, source)`` from ``--text-file``, ``--hub-wikitext`` or the bundled default file."""
    from ..eval.text import default_text_file, load_hub_wikitext, load_text

    if args.hub_wikitext:
        return load_hub_wikitext(), "hub:wikitext-2-raw-v1/test"
    path = args.text_file or default_text_file()
    if path is None:
        raise ValueError(
            "text_file: not given and the bundled WikiText-2 file is missing; pass --text-file PATH"
        )
    return load_text(path), str(path)


def _runnable_methods(names: str) -> tuple[list[Any], list[str]]:
    """Resolve ``--methods``; drop (with a message) baselines whose optional package is missing."""
    from ..eval.methods import method_available, resolve_methods

    methods, skipped = [], []
    resolved = resolve_methods(names)
    repeated = sorted({m.name for m in resolved if [n.name for n in resolved].count(m.name) > 1})
    if repeated:
        raise ValueError(f"methods={names!r} is not allowed; {repeated} appear more than once")
    for method in resolved:
        ok, why = method_available(method)
        if ok:
            methods.append(method)
        else:
            console.print(f"[yellow]{why}[/yellow]")
            skipped.append(method.name)
    if not methods:
        raise ValueError(f"methods={names!r}: none of them can run here")
    return methods, skipped


def _plot(draw: Any, rows: list[dict], path: str, title: str) -> None:
    from ..eval.plots import plots_available

    ok, why = plots_available()
    if not ok:
        console.print(f"[yellow]{why}[/yellow]")
        return
    console.print(f"wrote {draw(rows, path, title)}")


def _print_table(table: Table) -> None:
    """Print to stdout; at :data:`TABLE_WIDTH` columns when stdout is a file or a pipe."""
    (out if out.is_terminal else Console(width=TABLE_WIDTH)).print(table)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def run_quality(args: argparse.Namespace) -> None:
    from ..eval.perplexity import StreamSpec
    from ..eval.plots import plot_quality
    from ..eval.quality import STREAMING_TOLERANCE, evaluate_quality
    from ..eval.report import save_results
    from ..eval.text import tokenize_text
    from ..models import load_model

    started = time.perf_counter()
    methods, skipped = _runnable_methods(args.methods)
    spec = StreamSpec(args.window, args.windows, args.prefill, args.chunk, args.second_half)
    text, source = _read_text(args)
    model, tokenizer = load_model(args.model)
    from ..integrations.context import context_limit

    limit = context_limit(model.config.get_text_config(decoder=True))
    if limit.tokens and spec.window_tokens > limit.tokens:
        raise ValueError(
            f"window={spec.window_tokens} is not allowed; the model's context is {limit.tokens} tokens "
            f"({limit.source})"
        )
    token_ids = tokenize_text(tokenizer, text)
    spec.windows(token_ids)  # too-short text fails before any forward
    console.print(
        f"eval quality on {args.model}: {spec.num_windows} x {spec.window_tokens} tokens of {source} "
        f"(prefill {spec.prefill_tokens}, chunks of {spec.chunk_tokens}), {spec.num_scored} scored tokens"
    )
    rows = evaluate_quality(model, token_ids, methods, spec)
    _print_quality(rows, args.model, spec)
    exact = rows[0]
    lossless = abs(exact["streaming_rel_diff"]) <= STREAMING_TOLERANCE
    colour = "green" if lossless else "red"
    console.print(
        f"streaming check: exact cache streamed PPL {exact['ppl']:.4f} vs full-sequence PPL "
        f"{exact['full_sequence_ppl']:.4f}: [{colour}]{exact['streaming_rel_diff']:+.5%}[/{colour}] "
        f"(allowed ±{STREAMING_TOLERANCE:.1%})"
    )
    config = {
        "command": "eval quality",
        "model": args.model,
        "methods": [m.to_dict() for m in methods],
        "skipped_methods": skipped,
        "stream": asdict(spec),
        "text": source,
        "text_num_tokens": int(token_ids.numel()),
    }
    console.print(f"wrote {save_results(args.out, config, rows)}")
    _plot(
        plot_quality,
        rows,
        args.plot,
        f"{args.model}: {spec.num_scored} tokens, {spec.window_tokens}-token windows",
    )
    console.print(f"wall time {time.perf_counter() - started:.0f} s")


def _print_quality(rows: list[dict], model: str, spec: Any) -> None:
    scope = "second half of each window" if spec.score_second_half else "every token after the first"
    table = Table(title=f"eval quality — {model}, {spec.num_windows} x {spec.window_tokens} tokens, {scope}")
    columns = (
        "method",
        "bits/elem",
        "KV B/token",
        "PPL ± err",
        "scored",
        "ΔPPL",
        "KLD mean",
        "KLD p99",
        "top-1",
        "s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['bits_per_element']:.2f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f}",
            f"{r['num_scored']:,}",
            f"{r['delta_ppl_pct']:+.2f} %",
            _fmt(r["kld_mean"], ".2e"),
            _fmt(r["kld_p99"], ".2e"),
            _fmt(r["top1_agreement"], ".2%"),
            f"{r['seconds']:.0f}",
        )
    _print_table(table)
    console.print(
        "KLD = KL(exact || method) per scored token, nats; top-1 = argmax agreement with the exact cache; "
        "bits/elem and B/token: stored K/V history incl. scales and zero points, exact elements at 16 bits."
    )


def _parse_list(field: str, value: str, kind: type) -> tuple:
    try:
        items = tuple(kind(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise ValueError(
            f"{field}={value!r} is not allowed; give comma-separated {kind.__name__} values"
        ) from None
    if not items:
        raise ValueError(f"{field}={value!r} is not allowed; give at least one value")
    return items


def run_retrieval(args: argparse.Namespace) -> None:
    from ..eval.plots import plot_retrieval
    from ..eval.report import save_results
    from ..eval.retrieval import RetrievalSpec, evaluate_retrieval
    from ..eval.text import tokenize_text
    from ..models import load_model

    started = time.perf_counter()
    methods, skipped = _runnable_methods(args.methods)
    spec = RetrievalSpec(
        task=args.task,
        lengths=_parse_list("lengths", args.lengths, int),
        depths=_parse_list("depths", args.depths, float),
        num_seeds=args.seeds,
        new_tokens=args.new_tokens,
        chunk_tokens=args.chunk,
    )
    text, source = _read_text(args) if spec.task == "needle" else (None, None)
    model, tokenizer = load_model(args.model)
    text_ids = None if text is None else tokenize_text(tokenizer, text)
    console.print(
        f"eval retrieval ({spec.task}) on {args.model}: {len(methods)} methods x {len(spec.lengths)} lengths x "
        f"{len(spec.depths)} depths x {spec.num_seeds} seeds, prefill chunks of {spec.chunk_tokens}"
    )
    rows = evaluate_retrieval(model, tokenizer, methods, spec, text_ids)
    _print_retrieval(rows, args.model, spec)
    config = {
        "command": "eval retrieval",
        "model": args.model,
        "methods": [m.to_dict() for m in methods],
        "skipped_methods": skipped,
        "retrieval": asdict(spec),
        "text": source,
    }
    console.print(f"wrote {save_results(args.out, config, rows)}")
    _plot(
        plot_retrieval,
        rows,
        args.plot,
        f"{spec.task} retrieval — {args.model}, {spec.num_seeds} seeds per cell",
    )
    console.print(f"wall time {time.perf_counter() - started:.0f} s")


def _print_retrieval(rows: list[dict], model: str, spec: Any) -> None:
    table = Table(title=f"eval retrieval ({spec.task}) — {model}, accuracy over {spec.num_seeds} seeds")
    table.add_column("method")
    table.add_column("tokens", justify="right")
    for depth in spec.depths:
        table.add_column(f"depth {depth:g}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("s", justify="right")
    for method in dict.fromkeys(r["method"] for r in rows):
        for length in spec.lengths:
            cells = [r for r in rows if r["method"] == method and r["length"] == length]
            accuracy = sum(c["num_correct"] for c in cells) / sum(c["num_trials"] for c in cells)
            table.add_row(
                method,
                str(length),
                *(f"{c['accuracy']:.0%} ({c['num_correct']}/{c['num_trials']})" for c in cells),
                f"{accuracy:.0%}",
                f"{sum(c['seconds'] for c in cells):.0f}",
            )
    _print_table(table)
    console.print(
        "correct = the key's 5 digits appear in the digits of the greedy answer; depth = key position / length."
    )
