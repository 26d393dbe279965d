"""`kvsqueeze inspect`: a model's key/value ranges, outlier channels, each preset's risk and measured
decode KL, and the recommended configuration.

kvsqueeze inspect --model smollm2-135m [--text-file F] [--tokens 512] [--max-bits 4.6] [--json]

Keys and values are captured on the last ``--tokens`` tokens of the text. For every preset the risk
check (`calibration.risk`: predicted attention error, threshold `risk.UNSAFE`) runs on them and on
the weights (what `SqueezedCache.from_model` warns about), and the short measured check decodes the
last ``--decode-tokens`` tokens from a cache of that preset: mean KL and top-1 agreement of the
next-token distributions against the exact cache. Presets are listed by measured KL; the
recommendation is the safe one with the lowest KL within ``--max-bits`` (`inspection.recommend`).

Every flag is checked before the weights load, on the model's config and tokenizer: ``--tokens``
within the text and the model's context, and long enough that every preset has quantized a block
before the ``--decode-tokens`` checked ones (`inspection.check_inspection`); ``--max-bits`` at
least the smallest preset's.
"""

from __future__ import annotations

import argparse
import json
import math

from rich.table import Table

from .common import console, load_model_config, print_table
from .preflight import context_tokens, load_tokenizer, read_text


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..calibration.inspection import DECODE_TOKENS
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "inspect",
        help="per-layer K/V ranges, each preset's risk and measured decode KL, recommended configuration",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="named model, local folder or hub id (default: %(default)s)"
    )
    p.add_argument(
        "--text-file", default=None, help="UTF-8 text to capture K/V on (default: the WikiText-2 test file)"
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=512,
        help="tokens captured, from the END of the text; at most the model's context (default: %(default)s)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=DECODE_TOKENS,
        help="last tokens decoded by the measured check; the rest of --tokens is prefilled and must "
        "quantize a block of every preset (default: %(default)s)",
    )
    p.add_argument(
        "--max-bits",
        type=float,
        default=4.6,
        help="bits/element budget of the recommendation, at least the smallest preset's "
        "(default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (default: tables)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..calibration.inspection import (
        check_inspection,
        inspect_model,
        min_prefill_tokens,
        quantized_presets,
    )
    from ..eval.text import tokenize_text
    from ..models import load_model

    for flag, value in (("--tokens", args.tokens), ("--decode-tokens", args.decode_tokens)):
        if value < 1:
            raise ValueError(f"{flag}: {value}; allowed: a positive integer (a number of tokens)")
    if not math.isfinite(args.max_bits) or args.max_bits <= 0:
        raise ValueError(f"--max-bits: {args.max_bits}; allowed: a positive number of bits/element")
    text_file, text = read_text("--text-file", args.text_file)
    model_config = load_model_config("--model", args.model)
    check_inspection(model_config, args.tokens, args.max_bits, args.decode_tokens,
                     ("--tokens", "--max-bits", "--decode-tokens"))  # fmt: skip
    limit, source = context_tokens(model_config)
    if limit is not None and args.tokens > limit:
        raise ValueError(
            f"--tokens: {args.tokens} exceeds the model's context of {limit} ({source}); allowed: at most {limit}"
        )
    ids = tokenize_text(load_tokenizer("--model", args.model), text)
    if ids.numel() < args.tokens:
        least = min_prefill_tokens(quantized_presets(model_config)) + args.decode_tokens
        if ids.numel() < least:
            raise ValueError(
                f"--text-file: {str(text_file)!r} holds {ids.numel()} tokens; inspect needs at least {least} "
                f"(a block of every preset prefilled before the {args.decode_tokens} checked ones, --decode-tokens)"
            )
        raise ValueError(
            f"--tokens: {args.tokens} exceeds the {ids.numel()} tokens of --text-file {str(text_file)!r}; "
            f"allowed: {least} to {ids.numel()}"
        )
    model, _ = load_model(args.model)
    report = inspect_model(model, ids[-args.tokens :], args.max_bits, args.decode_tokens)
    if args.json:
        print(json.dumps({"model": args.model, **report}, indent=1))
        return
    t = Table(title=f"{args.model}: keys (pre-RoPE where possible) and values per layer")
    for c in ("layer", "|K| max", "K channel max/median", "outlier channels (head:ch)", "|V| max"):
        folds = c.startswith("outlier")  # the only long cell: it folds, the numbers never wrap
        t.add_column(
            c,
            justify="left" if folds else "right",
            no_wrap=not folds,
            overflow="fold" if folds else "ellipsis",
        )
    for layer, s in report["layers"].items():
        chans = ", ".join(f"{h}:{c}" for h, c in s["key_outlier_channels"][:6])
        more = len(s["key_outlier_channels"]) - 6
        t.add_row(layer, f"{s['key_absmax']:.2f}", f"{s['key_channel_ratio']:.1f}",
                  chans + (f" +{more}" if more > 0 else ""), f"{s['value_absmax']:.2f}")  # fmt: skip
    print_table(t)
    p = Table(
        title=f"Presets by decode KL on the last {report['decode_tokens']} tokens (risk: predicted attention "
        f"error, unsafe from {report['unsafe_threshold']})"
    )
    width = max((len(n) for n in report["presets"]), default=6)
    p.add_column("preset", no_wrap=True, min_width=width)  # never cut: it is what the user picks
    for c in ("bits/el", "KL", "top-1", "risk (text)", "risk (weights)", "verdict"):
        p.add_column(c, justify="right", no_wrap=True)
    p.add_column("notes", overflow="fold")
    for name, r in report["presets"].items():
        predicted = "-" if r["predicted_risk"] is None else f"{r['predicted_risk']:.3f}"
        over = r["overflow_layers"]
        notes = f"fp16 scale/zero-point overflow (layers {', '.join(map(str, over))})" if over else ""
        p.add_row(name, f"{r['bits_per_element']:.2f}", f"{r['kl']:.2e}", f"{r['top1']:.3f}", f"{r['risk']:.3f}",
                  predicted, "SAFE" if r["safe"] else "UNSAFE", notes)  # fmt: skip
    print_table(p)
    for name, r in report["presets"].items():
        if not r["safe"]:
            console.print(f"{name}: UNSAFE: {r['problems'][0]}")
    console.print(
        f"recommended within {report['max_bits']} bits/element (lowest measured KL among safe presets): "
        f"{report['recommended']}"
    )
