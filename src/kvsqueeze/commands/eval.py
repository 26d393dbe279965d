"""`kvsqueeze eval quality|retrieval`: quality and retrieval of cache methods against the exact cache.

kvsqueeze eval quality --methods exact,int8,k4v4,k2v2,quanto-int4 --window 2048 --windows 2
kvsqueeze eval retrieval --methods exact,k4v4,k2v2 --lengths 2048 --depths 0.1,0.5,0.9 --seeds 10

Each prints a table, saves its rows with their config and environment as JSON (``--out``) and draws a
figure (``--plot``; skipped when matplotlib is missing). Every method is saved as what ran on the model
(`eval.report.method_record`: a ``best-*`` name's bundled calibration, head_dim-fitted groups) with
the sizes `kvsqueeze presets` shows. Every option is checked before the model loads: numbers, the text,
the output paths, the methods against the model's config. The numbers are defined in
docs/eval_protocol.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from rich.markup import escape

from .common import console, load_model_config
from .options import (
    check_methods,
    check_outputs,
    check_positive,
    flag_errors,
    load_weights,
    parse_numbers,
    read_eval_text,
    runnable_methods,
)
from .preflight import context_tokens, load_tokenizer
from .row_table import method_label, print_rows, print_warnings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    parser = sub.add_parser(
        "eval",
        help="quality (perplexity, KLD) and retrieval of cache methods",
        description="Quality and retrieval of cache methods against the exact cache (docs/eval_protocol.md).",
    )
    tasks = parser.add_subparsers(dest="eval_command", required=True)
    methods_help = (
        "comma-separated methods: exact, a preset (kvsqueeze presets), <preset>@fused, a config JSON, "
        "quanto-int<2|4>, hqq-int<bits>"
    )

    quality = tasks.add_parser(
        "quality",
        help="streamed perplexity, ΔPPL, KLD and top-1 vs the exact cache",
        description="Streamed perplexity, ΔPPL, KLD and top-1 agreement of each method vs the exact cache.",
    )
    quality.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    quality.add_argument("--methods", default="exact,int8,k4v4,k2v2,quanto-int4", help=methods_help)
    _add_text_arguments(quality)
    quality.add_argument("--window", type=int, default=2048, help="tokens per window (fresh cache each)")
    quality.add_argument("--windows", type=int, default=2, help="number of consecutive windows")
    quality.add_argument("--prefill", type=int, default=256, help="tokens of the first forward per window")
    quality.add_argument("--chunk", type=int, default=64, help="tokens per forward after the prefill")
    quality.add_argument("--second-half", action="store_true", help="score only each window's second half")
    quality.add_argument("--out", default="results/quality.json", help="JSON file of config and results")
    quality.add_argument(
        "--plot", default="results/quality.png", help="figure of ΔPPL and KLD vs bits (.png/.pdf/.svg)"
    )
    quality.set_defaults(func=run_quality)

    retrieval = tasks.add_parser(
        "retrieval",
        help="passkey / needle-in-a-haystack retrieval accuracy",
        description="Passkey or needle-in-a-haystack retrieval accuracy of each method.",
    )
    retrieval.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    retrieval.add_argument("--methods", default="exact,k4v4,k2v2", help=methods_help)
    retrieval.add_argument("--task", choices=("passkey", "needle"), default="passkey", help="what is hidden")
    retrieval.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens, comma-separated")
    retrieval.add_argument("--depths", default="0.1,0.5,0.9", help="key depths in [0, 1], comma-separated")
    retrieval.add_argument("--seeds", type=int, default=10, help="trials per (length, depth)")
    retrieval.add_argument("--new-tokens", type=int, default=12, help="greedy tokens of the answer")
    retrieval.add_argument("--chunk", type=int, default=256, help="prefill chunk size in tokens")
    _add_text_arguments(retrieval, help_suffix=" (needle task only)")
    retrieval.add_argument("--out", default="results/retrieval.json", help="JSON file of config and results")
    retrieval.add_argument(
        "--plot", default="results/retrieval.png", help="figure, one heat map per method (.png/.pdf/.svg)"
    )
    retrieval.set_defaults(func=run_retrieval)


def _add_text_arguments(parser: argparse.ArgumentParser, help_suffix: str = "") -> None:
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--text-file", help=f"UTF-8 text (default: the bundled WikiText-2 test split){help_suffix}"
    )
    text.add_argument(
        "--hub-wikitext", action="store_true", help=f"download WikiText-2 with `datasets`{help_suffix}"
    )


def _plot(draw: Any, rows: list[dict], path: str, title: str) -> None:
    from ..eval.plots import plots_available

    ok, why = plots_available()
    if not ok:
        console.print(f"[yellow]{why}[/yellow]")
        return
    try:
        console.print(f"wrote {draw(rows, path, title)}")
    except (OSError, ValueError) as err:  # the results are saved already: say why, do not fail the run
        console.print(f"[yellow]--plot: {escape(repr(path))} was not drawn ({escape(str(err))})[/yellow]")


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


QUALITY_EXAMPLES = {"--window": "2048", "--windows": "2", "--prefill": "256", "--chunk": "64"}


def run_quality(args: argparse.Namespace) -> None:
    from ..eval.perplexity import StreamSpec
    from ..eval.plots import plot_quality
    from ..eval.quality import STREAMING_TOLERANCE, evaluate_quality
    from ..eval.report import save_results
    from ..eval.text import tokenize_text

    started = time.perf_counter()
    for flag, value in (("--window", args.window), ("--windows", args.windows), ("--prefill", args.prefill)):
        check_positive(flag, value)
    check_positive("--chunk", args.chunk)
    stream_flags = {
        "window_tokens": "--window",
        "num_windows": "--windows",
        "prefill_tokens": "--prefill",
        "chunk_tokens": "--chunk",
        "score_second_half": "--second-half",
    }
    with flag_errors(stream_flags, QUALITY_EXAMPLES):
        spec = StreamSpec(args.window, args.windows, args.prefill, args.chunk, args.second_half)
    check_outputs(args.out, args.plot)
    methods, skipped = runnable_methods("--methods", args.methods)
    text, source = read_eval_text(args.text_file, args.hub_wikitext)
    model_config = load_model_config("--model", args.model)
    context, context_source = context_tokens(model_config)
    if context and spec.window_tokens > context:
        raise ValueError(
            f"--window: {spec.window_tokens} is not allowed; the model's context is {context} tokens "
            f"({context_source}); allowed: at most {context}, e.g. --window {min(2048, context)}"
        )
    check_methods("--methods", methods, model_config, args.methods, args.model)
    token_ids = tokenize_text(load_tokenizer("--model", args.model), text)
    needed = spec.num_windows * spec.window_tokens
    if token_ids.numel() < needed:
        raise ValueError(
            f"--windows: {spec.num_windows} x --window {spec.window_tokens} needs {needed} tokens, but "
            f"{source} has only {token_ids.numel()}; lower --windows or --window"
        )
    model = load_weights(args.model)
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
    print_warnings(rows)
    config = {
        "command": "eval quality",
        "model": args.model,
        "methods": [method.record(model) for method in methods],
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
    columns = ("method", "bits/elem", "KV B/token", "quantized", "PPL ± err", "scored", "ΔPPL", "KLD mean")
    columns += ("KLD p99", "top-1", "s")
    cells = []
    for r in rows:
        quantized = r["quantized_tokens"]
        cells.append(
            (
                method_label(r["method"], r["warning"]),
                f"{r['bits_per_element']:.2f}",
                f"{r['bytes_per_token']:,.0f}",
                "—" if quantized is None else f"{quantized:,}/{spec.window_tokens:,}",
                f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f}",
                f"{r['num_scored']:,}",
                f"{r['delta_ppl_pct']:+.2f} %",
                _fmt(r["kld_mean"], ".2e"),
                _fmt(r["kld_p99"], ".2e"),
                _fmt(r["top1_agreement"], ".2%"),
                f"{r['seconds']:.0f}",
            )
        )
    print_rows(
        f"eval quality — {model}, {spec.num_windows} x {spec.window_tokens} tokens, {scope}", columns, cells
    )
    console.print(
        "KLD = KL(exact || method) per scored token, nats; top-1 = argmax agreement with the exact cache; "
        "bits/elem and B/token: the config that ran on this model (as `kvsqueeze presets` shows it), stored "
        "K/V history incl. scales and zero points, exact elements at 16 bits; quantized = tokens the last "
        "forward of each window read quantized, the most any scored prediction read (the rest: exact sinks, "
        "residual window and the forward's own tokens)."
    )


RETRIEVAL_FLAGS = {
    "task": "--task",
    "lengths": "--lengths",
    "length": "--lengths",
    "depths": "--depths",
    "depth": "--depths",
    "num_seeds": "--seeds",
    "new_tokens": "--new-tokens",
    "chunk_tokens": "--chunk",
    "haystack": "--text-file",
    "text_file": "--text-file",
}


RETRIEVAL_EXAMPLES = {
    "--lengths": "1024,2048",
    "--depths": "0.1,0.5,0.9",
    "--seeds": "10",
    "--new-tokens": "12",
    "--chunk": "256",
}


def run_retrieval(args: argparse.Namespace) -> None:
    from ..eval.plots import plot_retrieval
    from ..eval.report import save_results
    from ..eval.retrieval import RetrievalSpec, check_prompts, evaluate_retrieval
    from ..eval.text import tokenize_text

    started = time.perf_counter()
    with flag_errors(RETRIEVAL_FLAGS, RETRIEVAL_EXAMPLES):
        spec = RetrievalSpec(
            task=args.task,
            lengths=parse_numbers("--lengths", args.lengths, "1024,2048", echo=True),
            depths=parse_numbers(
                "--depths", args.depths, "0.1,0.5,0.9", float, 0, 1, echo=True, field="depth"
            ),
            num_seeds=args.seeds,
            new_tokens=args.new_tokens,
            chunk_tokens=args.chunk,
        )
    if spec.task != "needle" and (args.text_file or args.hub_wikitext):
        flag = "--text-file" if args.text_file else "--hub-wikitext"
        raise ValueError(
            f"{flag}: the {spec.task} task does not read a text; allowed with --task needle only"
        )
    check_outputs(args.out, args.plot)
    methods, skipped = runnable_methods("--methods", args.methods)
    text, source = (
        read_eval_text(args.text_file, args.hub_wikitext) if spec.task == "needle" else (None, None)
    )
    model_config = load_model_config("--model", args.model)
    context, context_source = context_tokens(model_config)
    longest = max(spec.lengths)
    if context and longest + spec.new_tokens > context:
        flag, value = (
            ("--lengths", list(spec.lengths)) if longest >= context else ("--new-tokens", spec.new_tokens)
        )
        raise ValueError(
            f"{flag}: {value} is not allowed; the longest length {longest} + --new-tokens {spec.new_tokens} "
            f"exceeds the model's context of {context} tokens ({context_source}); allowed: "
            + (
                f"lengths up to {context - spec.new_tokens}"
                if flag == "--lengths"
                else f"--new-tokens up to {context - longest}"
            )
        )
    check_methods("--methods", methods, model_config, args.methods, args.model)
    tokenizer = load_tokenizer("--model", args.model)
    text_ids = None if text is None else tokenize_text(tokenizer, text)
    with flag_errors(RETRIEVAL_FLAGS, RETRIEVAL_EXAMPLES):
        check_prompts(tokenizer, spec, text_ids)
    model = load_weights(args.model)
    console.print(
        f"eval retrieval ({spec.task}) on {args.model}: {len(methods)} methods x {len(spec.lengths)} lengths x "
        f"{len(spec.depths)} depths x {spec.num_seeds} seeds, prefill chunks of {spec.chunk_tokens}"
    )
    rows = evaluate_retrieval(model, tokenizer, methods, spec, text_ids)
    _print_retrieval(rows, args.model, spec)
    print_warnings(rows)
    config = {
        "command": "eval retrieval",
        "model": args.model,
        "methods": [method.record(model) for method in methods],
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
    columns = ("method", "tokens", "quantized", *(f"depth {d:g}" for d in spec.depths), "mean", "s")
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for length in spec.lengths:
            cells = [r for r in rows if r["method"] == method and r["length"] == length]
            accuracy = sum(c["num_correct"] for c in cells) / sum(c["num_trials"] for c in cells)
            quantized = cells[0]["quantized_tokens"]
            table.append(
                (
                    method_label(method, cells[0]["warning"]),
                    str(length),
                    "—" if quantized is None else f"{quantized:,}",
                    *(f"{c['accuracy']:.0%} ({c['num_correct']}/{c['num_trials']})" for c in cells),
                    f"{accuracy:.0%}",
                    f"{sum(c['seconds'] for c in cells):.0f}",
                )
            )
    title = f"eval retrieval ({spec.task}) — {model}, accuracy over {spec.num_seeds} seeds"
    print_rows(title, columns, table)
    console.print(
        "correct = the key's 5 digits appear in the digits of the greedy answer; depth = key position / length; "
        "quantized = tokens the answer's last step read quantized."
    )
