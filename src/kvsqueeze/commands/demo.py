"""`kvsqueeze demo`: the main job — the exact cache vs the plain quantization presets (`--presets`,
default `eval.demo.DEFAULT_DEMO_PRESETS`: none, int8, fp8, k4v4, k4v2, k2v2) on a long built-in prompt.

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
    from ..eval.demo import DEFAULT_DEMO_PRESETS
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
    demo.add_argument("--json", help="also write config, environment and rows to this JSON file")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..config import PRESETS, TOKEN_PRESETS
    from ..eval.demo import demo_methods, demo_prompt, rows_to_dicts, run_demo
    from ..eval.methods import FUSED_SUFFIX
    from ..eval.report import save_results

    check_positive("--new-tokens", args.new_tokens)
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
        methods = demo_methods(names)
    except ValueError as err:
        raise ValueError(f"--presets: {str(err).removeprefix('method: ')}") from None
    check_output_path("--json", args.json)
    model_config = load_model_config("--model", args.model)
    check_methods("--presets", methods, model_config, args.presets, args.model)
    tokenizer = load_tokenizer("--model", args.model)
    prompt_tokens = demo_prompt(tokenizer).shape[1]
    context, source = context_tokens(model_config)
    if context and prompt_tokens + args.new_tokens > context:
        raise ValueError(
            f"--new-tokens: {args.new_tokens} is not allowed; the {prompt_tokens}-token prompt plus it exceeds "
            f"the model's context of {context} tokens ({source}); allowed: 1 to {context - prompt_tokens}"
        )
    model = load_weights(args.model)
    console.print(
        f"Demo on {args.model}: built-in report prompt ({prompt_tokens} tokens), {args.new_tokens} new tokens "
        "per preset"
    )
    rows = rows_to_dicts(run_demo(model, tokenizer, names, args.new_tokens))
    columns = ("preset", "bits/elem", "held B/tok", "x less", "packed B/tok", "x less", "quantized", "agree")
    columns += ("1st diff", "tok/s")
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
        )
        for r in rows
    ]
    print_rows(f"kvsqueeze demo — {args.model}, {args.new_tokens} greedy tokens", columns, cells)
    console.print(
        "held = everything the cache holds (packed blocks, scales, block tables, exact sinks and residual "
        "window, in float16 for a float32 model) / tokens of this short run; packed = the packed history alone, what a token "
        "costs at long contexts (as `kvsqueeze presets` shows it); x less = how many times smaller than an fp16 "
        "cache; quantized = tokens the last decode step read quantized; agree = teacher-forced greedy argmax "
        "equal to the exact cache's, position by position."
    )
    print_warnings(rows)
    if args.json:
        config = {
            "command": "demo",
            "model": args.model,
            "new_tokens": args.new_tokens,
            "prompt_tokens": prompt_tokens,
            "methods": [method.record(model) for method in methods],
        }
        console.print(f"wrote {save_results(args.json, config, rows)}")
