"""`kvsqueeze demo`: the main job — the exact cache vs the plain quantization presets (`--presets`,
default `eval.demo.DEFAULT_DEMO_PRESETS`: none, int8, fp8, k4v4, k4v2, k2v2) on a long built-in prompt
(`--context`, default 4000 tokens), each read by the fused path (`--path`) with the reference path's
speed beside it and the speed-ups.

Every option is checked before the model loads; ``--json`` saves ``{"config", "environment",
"results"}`` (`eval.report.save_results`) with each preset as what ran on the model
(`eval.report.method_record`).
"""

from __future__ import annotations

import argparse

from .common import check_output_path, console, load_model_config
from .options import (
    check_methods,
    check_positive,
    load_weights,
    split_list,
)
from .preflight import context_tokens, load_tokenizer
from .row_table import method_label, print_rows, print_warnings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..eval.demo import DEFAULT_DEMO_CONTEXT, DEFAULT_DEMO_PRESETS, DEFAULT_REFERENCE_TOKENS
    from ..models import DEFAULT_MODEL

    demo = sub.add_parser(
        "demo",
        help="exact cache vs the plain quantization presets on a long built-in prompt (offline)",
        description="The exact cache vs each preset of --presets (by default the plain quantization presets; "
        "best-*, token-policy presets and config files on request) on a long built-in prompt: bytes, "
        "agreement, speed.",
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    demo.add_argument(
        "--presets",
        default=",".join(DEFAULT_DEMO_PRESETS),
        help="comma-separated kvsqueeze presets (kvsqueeze presets), <preset>@fused or config JSONs",
    )
    demo.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per preset")
    demo.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"prompt tokens: the built-in report followed by copies of itself up to about this many (reading "
        f"the cache then dominates a decode step); default {DEFAULT_DEMO_CONTEXT}, or the model's context minus "
        "--new-tokens when that is smaller",
    )
    demo.add_argument(
        "--path",
        choices=("fused", "reference"),
        default="fused",
        help="read path of the presets' runs: fused (attn_implementation kvsqueeze) or reference",
    )
    demo.add_argument(
        "--reference-tokens",
        type=int,
        default=DEFAULT_REFERENCE_TOKENS,
        help="decode steps timed on the reference path beside each fused run (0: skip)",
    )
    demo.add_argument("--json", help="also write config, environment and rows to this JSON file")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..config import PRESETS, TOKEN_PRESETS
    from ..eval.demo import DEFAULT_DEMO_CONTEXT, demo_methods, demo_prompt, rows_to_dicts, run_demo
    from ..eval.methods import FUSED_SUFFIX
    from ..eval.report import save_results

    check_positive("--new-tokens", args.new_tokens)
    if args.context is not None:
        check_positive("--context", args.context)
    if isinstance(args.reference_tokens, bool) or args.reference_tokens < 0:
        raise ValueError(f"--reference-tokens: {args.reference_tokens!r} is not allowed; allowed: 0 or more")
    fused = args.path == "fused"
    names = split_list(args.presets)
    if not names:
        raise ValueError(f"--presets: {args.presets!r} names no preset; give e.g. k4v4,k2v2")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"--presets: {args.presets!r} is not allowed; {repeated} appear more than once; give each once, "
            "e.g. k4v4,k2v2"
        )
    allowed = (
        f"allowed: comma-separated presets ({', '.join([*PRESETS, *TOKEN_PRESETS])}), <preset>{FUSED_SUFFIX} "
        "or config .json files, e.g. k4v4,k2v2"
    )
    for name in names:
        base = name.removesuffix(FUSED_SUFFIX)
        if base not in PRESETS and base not in TOKEN_PRESETS and not base.endswith(".json"):
            known = base == "exact" or "-int" in base  # a method of eval/bench, not a kvsqueeze preset
            why = "is not a kvsqueeze preset" if known else "is unknown"
            raise ValueError(f"--presets: {'' if known else 'method: '}{name!r} {why}; {allowed}")
    try:
        methods = demo_methods(names, fused=fused)
    except ValueError as err:
        raise ValueError(f"--presets: {str(err).removeprefix('method: ')}") from None
    check_output_path("--json", args.json)
    model_config = load_model_config("--model", args.model)
    check_methods("--presets", methods, model_config, args.presets, args.model)
    tokenizer = load_tokenizer("--model", args.model)
    context, source = context_tokens(model_config)
    wanted = args.context
    if wanted is None:  # the default: 4000 tokens, fewer on a model with a shorter context
        wanted = DEFAULT_DEMO_CONTEXT if not context else min(DEFAULT_DEMO_CONTEXT, context - args.new_tokens)
    elif context and wanted + args.new_tokens > context:
        raise ValueError(
            f"--context: {wanted} is not allowed; with --new-tokens {args.new_tokens} it exceeds the model's "
            f"context of {context} tokens ({source}); allowed: 1 to {context - args.new_tokens}"
        )
    prompt_tokens = demo_prompt(tokenizer, wanted).shape[1]
    if context and prompt_tokens + args.new_tokens > context:
        raise ValueError(
            f"--new-tokens: {args.new_tokens} is not allowed; the {prompt_tokens}-token prompt plus it exceeds "
            f"the model's context of {context} tokens ({source}); allowed: 1 to {context - prompt_tokens}"
        )
    model = load_weights(args.model)
    console.print(
        f"Demo on {args.model}: built-in report prompt ({prompt_tokens} tokens), {args.new_tokens} new tokens "
        f"per preset, {args.path} read path"
        + (
            f" (reference path timed over {args.reference_tokens} tokens beside it)"
            if fused and args.reference_tokens
            else ""
        )
    )
    rows = rows_to_dicts(
        run_demo(
            model,
            tokenizer,
            names,
            args.new_tokens,
            context_tokens=wanted,
            fused=fused,
            reference_tokens=args.reference_tokens if fused else 0,
        )
    )

    def speed(x: float | None, suffix: str = "") -> str:
        return "—" if x is None else f"{x:.1f}{suffix}" if suffix != "x" else f"{x:.2f}x"

    columns = ("preset", "bits/elem", "held B/tok", "x less", "packed B/tok", "x less", "quantized", "agree")
    columns += ("1st diff", f"{args.path} tok/s", "ref tok/s", "vs ref", "vs exact")
    cells = [
        (
            method_label(r["preset"], r["warning"]),
            f"{r['bits_per_element']:.2f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['compression_vs_fp16']:.2f}x",
            f"{r['packed_bytes_per_token']:,.0f}",
            f"{r['packed_compression_vs_fp16']:.2f}x",
            "—" if r["quantized_tokens"] is None else f"{r['quantized_tokens']:,}",
            f"{r['agreement']:.1%}",
            str(r["first_divergence"]),
            f"{r['decode_tokens_per_s']:.1f}",
            speed(r["reference_tokens_per_s"]),
            speed(r["speedup_vs_reference"], "x"),
            speed(r["speedup_vs_exact"], "x"),
        )
        for r in rows
    ]
    exact_speed = rows[0]["exact_tokens_per_s"] if rows else None
    title = f"kvsqueeze demo — {args.model}, {prompt_tokens}-token prompt, {args.new_tokens} greedy tokens"
    if exact_speed:
        title += f"; exact cache {exact_speed:.1f} tok/s"
    print_rows(title, columns, cells)
    console.print(
        "held = everything the cache holds (packed blocks, scales, block tables, exact sinks and residual "
        "window, in float16 for a float32 model) / tokens of this short run; packed = the packed history alone, what a token "
        "costs at long contexts (as `kvsqueeze presets` shows it); x less = how many times smaller than an fp16 "
        "cache; quantized = tokens the last decode step read quantized; agree = teacher-forced greedy argmax "
        "equal to the exact cache's, position by position; tok/s = decode speed on the read path of the run, "
        "ref tok/s = the same cache on the reference path (dequantize, then attention; — where only the fused "
        "path runs the preset), vs ref / vs exact = speed-up over it / over the exact cache."
    )
    print_warnings(rows)
    if args.json:
        config = {
            "command": "demo",
            "model": args.model,
            "new_tokens": args.new_tokens,
            "prompt_tokens": prompt_tokens,
            "context": wanted,
            "path": args.path,
            "reference_tokens": args.reference_tokens if fused else 0,
            "methods": [method.record(model) for method in methods],
        }
        console.print(f"wrote {save_results(args.json, config, rows)}")
