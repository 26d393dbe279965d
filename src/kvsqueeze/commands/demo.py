"""`kvsqueeze demo`: the main job — exact cache vs every preset on a long built-in prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from ..config import preset
from .common import console, out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    demo = sub.add_parser("demo", help="exact cache vs every preset on a long built-in prompt (offline)")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--presets", default="none,int8,fp8,k4v4,k4v2,k2v2")
    demo.add_argument("--new-tokens", type=int, default=128)
    demo.add_argument("--json", help="also write the rows to this JSON file")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..eval.demo import run_demo
    from ..models import load_model

    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    for name in presets:
        preset(name)
    model, tokenizer = load_model(args.model)
    console.print(f"Demo on {args.model}: built-in report prompt, {args.new_tokens} new tokens per preset")
    rows = run_demo(model, tokenizer, presets, args.new_tokens)
    table = Table(title=f"kvsqueeze demo — {args.model}, {args.new_tokens} greedy tokens")
    for col in (
        "preset",
        "held B/tok",
        "x less",
        "packed B/tok",
        "x less",
        "agree",
        "1st diff",
        "tok/s",
    ):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for r in rows:
        table.add_row(
            r.preset,
            f"{r.bytes_per_token:,.0f}",
            f"{r.compression_vs_fp16:.2f}x",
            f"{r.packed_bytes_per_token:,.0f}",
            f"{r.packed_compression_vs_fp16:.2f}x",
            f"{r.agreement:.1%}",
            str(r.first_divergence),
            f"{r.decode_tokens_per_s:.1f}",
        )
    out.print(table)
    console.print(
        "held = everything the cache holds (packed pages incl. unused page tail, scales, exact sinks and residual "
        "window, in the model's dtype) / tokens of this short run; packed = the packed history alone, what a token "
        "costs at long contexts; x less = how many times smaller than an fp16 cache; agree = teacher-forced "
        "greedy argmax equal to the exact cache's, position by position."
    )
    if args.json:
        from ..eval.demo import rows_to_dicts

        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows_to_dicts(rows)}, indent=2))
        console.print(f"wrote {args.json}")
