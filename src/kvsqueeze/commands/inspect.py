"""`kvsqueeze inspect`: a model's key/value ranges, outlier channels, each preset's risk and measured
decode KL, and the recommended configuration.

kvsqueeze inspect --model smollm2-135m [--text-file F] [--tokens 512] [--max-bits 4.6] [--json]

Keys and values are captured on the last ``--tokens`` tokens of the text. For every preset the risk
check (`calibration.risk`: predicted attention error, threshold `risk.UNSAFE`) runs on them and on
the weights (what `SqueezedCache.from_model` warns about), and the short measured check decodes the
last ``--decode-tokens`` tokens from a cache of that preset: mean KL and top-1 agreement of the
next-token distributions against the exact cache. Presets are listed by measured KL; the
recommendation is the safe one with the lowest KL within ``--max-bits`` (`inspection.recommend`).
"""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from .common import console, out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "inspect",
        help="per-layer K/V ranges, each preset's risk and measured decode KL, recommended configuration",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    p.add_argument("--text-file", default=None, help="text to capture K/V on (default: WikiText-2 test)")
    p.add_argument("--tokens", type=int, default=512, help="tokens captured, from the END of the text")
    p.add_argument("--decode-tokens", type=int, default=128, help="last tokens decoded by the measured check")
    p.add_argument("--max-bits", type=float, default=4.6, help="bits/element budget of the recommendation")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..calibration.inspection import inspect_model
    from ..eval.text import default_text_file, load_text, tokenize_text
    from ..models import load_model

    text_file = args.text_file or default_text_file()
    if text_file is None:
        raise ValueError("--text-file: no default text found; pass --text-file PATH")
    model, tokenizer = load_model(args.model)
    ids = tokenize_text(tokenizer, load_text(text_file))[-args.tokens :]
    report = inspect_model(model, ids, args.max_bits, args.decode_tokens)
    if args.json:
        print(json.dumps({"model": args.model, **report}, indent=1))
        return
    t = Table(title=f"{args.model}: keys (pre-RoPE where possible) and values per layer")
    for c in ("layer", "|K| max", "K channel max/median", "outlier channels (head, ch)", "|V| max"):
        t.add_column(c, justify="right")
    for layer, s in report["layers"].items():
        chans = ", ".join(f"{h}:{c}" for h, c in s["key_outlier_channels"][:6])
        more = len(s["key_outlier_channels"]) - 6
        t.add_row(layer, f"{s['key_absmax']:.2f}", f"{s['key_channel_ratio']:.1f}",
                  chans + (f" +{more}" if more > 0 else ""), f"{s['value_absmax']:.2f}")  # fmt: skip
    out.print(t)
    p = Table(
        title=f"Presets by decode KL on the last {report['decode_tokens']} tokens (risk: predicted attention "
        f"error, unsafe from {report['unsafe_threshold']})"
    )
    for c in ("preset", "bits/el", "KL", "top-1", "risk (text)", "risk (weights)", "verdict", "notes"):
        p.add_column(c, justify="left" if c in ("preset", "notes") else "right")
    for name, r in report["presets"].items():
        predicted = "-" if r["predicted_risk"] is None else f"{r['predicted_risk']:.3f}"
        over = r["overflow_layers"]
        notes = f"fp16 scale/zero-point overflow (layers {', '.join(map(str, over))})" if over else ""
        p.add_row(name, f"{r['bits_per_element']:.2f}", f"{r['kl']:.2e}", f"{r['top1']:.3f}", f"{r['risk']:.3f}",
                  predicted, "SAFE" if r["safe"] else "UNSAFE", notes)  # fmt: skip
    out.print(p)
    for name, r in report["presets"].items():
        if not r["safe"]:
            console.print(f"{name}: UNSAFE: {r['problems'][0]}")
    console.print(
        f"recommended within {report['max_bits']} bits/element (lowest measured KL among safe presets): "
        f"{report['recommended']}"
    )
