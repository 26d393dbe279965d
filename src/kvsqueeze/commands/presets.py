"""`kvsqueeze presets`: every preset as it resolves for a model, with its bits/element and bytes/token.

A preset name is shown as `SqueezedCache` would build it for ``--model``: the bundled calibration
of the ``best-*`` presets when one fits the model, else the generic preset with its per-token
groups fitted to the model's head_dim (`kvsqueeze.config.preset`); a preset the model still cannot
take says why.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from ..config import PRESET_NOTES, PRESETS, TOKEN_PRESETS, CacheConfig, preset, resolve_config
from ..quant.exact import FP16
from ..quant.spec import Axis, QuantSpec
from .common import console, load_model_config, model_shape, print_table

TABLE_WIDTH = 160  # when stdout is not a terminal


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    pre = sub.add_parser("presets", help="list presets with bits/element and bytes/token for a model")
    pre.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    pre.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pre.set_defaults(func=run)


def spec_text(spec: QuantSpec | None) -> str:
    """A short label of a spec, e.g. ``int4 ch g64``, ``nf2 tok g48 +1% out``, ``exact``."""
    if spec is None:
        return "exact"
    kind = "fp8" if spec.is_fp8 else f"{spec.format.value}{spec.bits}"
    text = f"{kind} {'ch' if spec.axis is Axis.CHANNEL else 'tok'} g{spec.group_size}"
    return text + (f" +{spec.outlier_fraction:.2%} out" if spec.has_outliers else "")


def group_changes(nominal: CacheConfig, resolved: CacheConfig) -> list[str]:
    """The group sizes fitting to a head_dim changed, e.g. ``["value.group_size 64 -> 48"]``."""
    return [
        f"{name}.group_size {a.group_size} -> {b.group_size}"
        for (name, a), (_, b) in zip(nominal.named_specs(), resolved.named_specs(), strict=True)
        if a.group_size != b.group_size
    ]


def resolve_for_model(name: str, model_config: Any) -> tuple[CacheConfig, dict]:
    """What preset ``name`` becomes on this model: its config, and a row of key/value labels, group
    changes, whether the model can take it and a note."""
    from ..calibration.bundled import bundled_config

    layers, heads, head_dim, _ = model_shape(model_config)
    calibrated = bundled_config(name, model_config)
    config = calibrated or resolve_config(name, head_dim=head_dim)
    try:
        config.check_model(heads, head_dim, layers)
        error = None
    except ValueError as err:
        error = str(err)
    changes = [] if calibrated else group_changes(preset(name), config)
    note = PRESET_NOTES[name]
    if calibrated and name in PRESETS:
        note = "per-layer calibration bundled for this model"
    elif calibrated:
        note += "; per-layer budgets bundled for this model"
    if changes:
        note += f"; for head_dim {head_dim}: " + ", ".join(changes)
    if error:
        note = f"NOT USABLE with this model: {error}"
    return config, {
        "preset": name,
        "keys": "per layer" if config.layer_overrides else spec_text(config.key),
        "values": "per layer" if config.layer_overrides else spec_text(config.value),
        "head_dim_fit": changes,
        "usable": error is None,
        "config": config.to_dict(),
        "note": note,
    }


def run(args: argparse.Namespace) -> None:
    from ..eval.report import config_sizes

    model_config = load_model_config("--model", args.model)
    layers, heads, head_dim, _ = model_shape(model_config)
    fp16 = FP16.kv_bytes_per_token(layers, heads, head_dim)
    rows = []
    for name in PRESETS:
        cfg, row = resolve_for_model(name, model_config)
        row |= {
            **config_sizes(cfg, model_config),  # the sizes eval, demo and inspect show too
            "sink_tokens": cfg.sink_tokens,
            "residual_window": cfg.residual_window,
        }
        rows.append(row)
    tokens = [resolve_for_model(name, model_config)[1] for name in TOKEN_PRESETS]
    if args.json:
        payload = {
            "model": args.model,
            "head_dim": head_dim,
            "fp16_bytes_per_token": fp16,
            "presets": rows,
            "token_presets": tokens,
        }
        print(json.dumps(payload, indent=2))
        return
    table = Table(
        title=f"Presets for {args.model} ({layers} layers x {heads} KV heads x head_dim {head_dim})"
    )
    cols = ("preset", "keys", "values", "bits/elem", "bytes/token", "vs fp16", "sinks", "window", "what")
    for col in cols:  # everything but the note stays on one line
        left = col in ("preset", "keys", "values", "what")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "what")
    for r in rows:
        table.add_row(
            r["preset"],
            r["keys"],
            r["values"],
            f"{r['bits_per_element']:.2f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['fraction_of_fp16']:.3f}",
            str(r["sink_tokens"]),
            str(r["residual_window"]),
            r["note"],
        )
    print_table(table, width=TABLE_WIDTH)
    more = Table(title="Token-policy presets (per-token precision / eviction; bytes depend on the text)")
    for col in ("preset", "keys", "values", "what"):
        more.add_column(col, no_wrap=col != "what")
    for r in tokens:
        more.add_row(r["preset"], r["keys"], r["values"], r["note"])
    print_table(more, width=TABLE_WIDTH)
    console.print(
        "bytes/token: packed history incl. scales and zero points, all layers, K+V; exact sinks and the "
        "residual window add a fixed amount per sequence ('none' counted at fp16 here). keys/values: "
        "format, grouping (ch: per-channel, tok: per-token) and group size as used with this model."
    )
