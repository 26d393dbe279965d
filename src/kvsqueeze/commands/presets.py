"""`kvsqueeze presets`: every preset's bits/element and bytes/token for a model."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..config import PRESET_NOTES, PRESETS, TOKEN_PRESETS
from .common import console, model_shape, out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    pre = sub.add_parser("presets", help="list presets with bits/element and bytes/token for a model")
    pre.add_argument("--model", default=DEFAULT_MODEL)
    pre.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pre.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from ..calibration.bundled import bundled_config
    from ..models import resolve_model

    model_config = AutoConfig.from_pretrained(resolve_model(args.model))
    layers, heads, head_dim, _ = model_shape(model_config)
    fp16 = 2 * 2 * layers * heads * head_dim
    rows = []
    for name, generic in PRESETS.items():
        calibrated = bundled_config(name, model_config)
        cfg = calibrated or generic
        per_token = cfg.bytes_per_token(layers, heads, head_dim, exact_bytes=2)
        rows.append(
            {
                "preset": name,
                "bits_per_element": cfg.bits_per_element(exact_bits=16, num_layers=layers),
                "bytes_per_token": per_token,
                "fraction_of_fp16": per_token / fp16,
                "sink_tokens": cfg.sink_tokens,
                "residual_window": cfg.residual_window,
                "config": cfg.to_dict(),
                "note": "per-layer calibration bundled for this model" if calibrated else PRESET_NOTES[name],
            }
        )
    tokens = []
    for name, generic in TOKEN_PRESETS.items():
        calibrated = bundled_config(name, model_config)
        note = PRESET_NOTES[name] + ("; per-layer budgets bundled for this model" if calibrated else "")
        tokens.append({"preset": name, "config": (calibrated or generic).to_dict(), "note": note})
    if args.json:
        payload = {
            "model": args.model,
            "fp16_bytes_per_token": fp16,
            "presets": rows,
            "token_presets": tokens,
        }
        print(json.dumps(payload, indent=2))
        return
    table = Table(
        title=f"Presets for {args.model} ({layers} layers x {heads} KV heads x head_dim {head_dim})"
    )
    for col in ("preset", "bits/elem", "bytes/token", "vs fp16", "sinks", "window", "what"):
        table.add_column(col, justify="left" if col in ("preset", "what") else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            f"{r['bits_per_element']:.2f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['fraction_of_fp16']:.3f}",
            str(r["sink_tokens"]),
            str(r["residual_window"]),
            r["note"],
        )
    out.print(table)
    more = Table(title="Token-policy presets (per-token precision / eviction; bytes depend on the text)")
    for col in ("preset", "what"):
        more.add_column(col)
    for r in tokens:
        more.add_row(r["preset"], r["note"])
    out.print(more)
    console.print(
        "bytes/token: packed history incl. scales and zero points, all layers, K+V; exact sinks and the "
        "residual window add a fixed amount per sequence ('none' counted at fp16 here)."
    )
