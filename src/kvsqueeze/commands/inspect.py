"""`kvsqueeze inspect`: a model's key/value ranges, outlier channels and predicted safe configuration.

kvsqueeze inspect --model smollm2-135m [--text-file F] [--tokens 512] [--json]

Keys and values are captured on the last ``--tokens`` tokens of the text; each preset is then
quantized on them (as a cache page would be) and its relative error per layer compared with the
risk threshold (`calibration.risk.UNSAFE`); the weight-based prediction that
`SqueezedCache.from_model` uses is shown beside it.
"""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from .common import console, out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    p = sub.add_parser("inspect", help="per-layer K/V ranges, outlier channels, predicted safe configuration")
    p.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    p.add_argument("--text-file", default=None, help="text to capture K/V on (default: WikiText-2 test)")
    p.add_argument("--tokens", type=int, default=512, help="tokens captured, from the END of the text")
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
    report = inspect_model(model, ids)
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
    p = Table(title="Presets: worst per-layer relative error (measured on the text / predicted from weights)")
    for c in ("preset", "bits/el", "K err", "V err", "weights: predicted", "verdict"):
        p.add_column(c, justify="right")
    for name, r in report["presets"].items():
        p.add_row(name, f"{r['bits_per_element']:.2f}", f"{r['key_error']:.3f}", f"{r['value_error']:.3f}",
                  "unsafe" if r["predicted_unsafe"] else "safe", "SAFE" if r["safe"] else "UNSAFE")  # fmt: skip
    out.print(p)
    console.print(f"predicted safe configuration (fewest bits/element): {report['safe_preset']}")
