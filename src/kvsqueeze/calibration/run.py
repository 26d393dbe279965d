"""`calibrate`: statistics, codebooks and a per-layer bit allocation for one model, saved as JSON.

The calibration slice is the LAST ``num_tokens`` tokens of the text (evaluation windows are taken
from its start, so the two never overlap as long as the text holds more than
``num_tokens + evaluated tokens``); the file records the slice. The saved file is
``{"config": <CacheConfig dict with layer_overrides>, "calibration": {...}}`` and
`CacheConfig.load` (or any ``--kv``/``--methods`` accepting ``<file>.json``) reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import CacheConfig
from ..integrations.rope import rope_for
from ..quant.spec import QuantSpec
from .allocation import (
    KEEP_EXACT_POWER,
    allocate,
    keep_exact_by_layer,
    layer_sensitivity,
    measure,
    overrides,
    with_bits,
)
from .capture import capture
from .codebooks import fit_codebook
from .stats import layer_stats


def _r(x: Any) -> Any:
    """Round floats (nested lists too) to 4 decimals to keep the file small."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [_r(v) for v in x]
    return x


def calibrate(
    model: Any,
    token_ids: torch.Tensor,
    base: CacheConfig,
    target_bits: float,
    bits_menu: tuple[int, ...] = (2, 3, 4),
    num_tokens: int = 1024,
    prefill_tokens: int = 256,
    score_tokens: int = 64,
    log: Callable[[str], None] = print,
    reuse: dict | None = None,
) -> dict:
    """The calibration file's content for ``model`` (see module docstring).

    ``reuse``: the ``"calibration"`` entry of an earlier file with the same base, slice and bits;
    its codebooks and sensitivities are taken as they are and only the allocation is redone (for
    another ``target_bits``)."""
    if base.tokens is not None:
        if reuse is not None:
            raise ValueError("reuse: a token-policy calibration has no bit allocation to redo; allowed: None")
        return _calibrate_keep_exact(model, token_ids, base, num_tokens, prefill_tokens, score_tokens, log)
    if base.key is None or base.value is None or base.layer_overrides:
        raise ValueError("preset: calibration needs a base config with key and value specs and no overrides")
    start, ids = _slice(token_ids, num_tokens)
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope, why = rope_for(text, head_dim) if base.pre_rope_keys else (None, "")
    if base.pre_rope_keys and rope is None:
        log(f"pre-RoPE keys unavailable ({why}); calibrating post-RoPE keys")
        base = base.replace(pre_rope_keys=False)
    got = capture(model, ids, rope)
    layers = sorted(got.keys)
    stats = {layer: layer_stats(got.keys[layer], got.values[layer]) for layer in layers}
    codebooks: dict[str, dict[int, dict[int, tuple[float, ...]]]] = {"key": {}, "value": {}}
    if reuse is not None and "codebooks" in reuse:
        codebooks = {k: {int(layer): {int(b): tuple(v) for b, v in per.items()} for layer, per in d.items()}
                     for k, d in reuse["codebooks"].items()}  # fmt: skip
    for kind, spec, rotated in (
        ("key", base.key, base.rotate_keys),
        ("value", base.value, base.rotate_values),
    ):
        if spec.is_codebook and not any(codebooks[kind].values()):
            data = got.keys if kind == "key" else got.values
            for layer in layers:
                codebooks[kind][layer] = {
                    b: fit_codebook(data[layer], with_bits(spec, b), rotated, base.rotation_seed)
                    for b in bits_menu
                    if b <= 4
                }

    def spec_for(kind: str, layer: int, bits: int) -> QuantSpec:
        spec = base.key if kind == "key" else base.value
        return with_bits(spec, bits, codebooks[kind].get(layer, {}).get(bits))

    needed = base.sink_tokens + prefill_tokens + score_tokens
    if reuse is not None:
        sens = {k: {int(layer): {int(b): v for b, v in d.items()} for layer, d in per.items()}
                for k, per in reuse["sensitivity"].items()}  # fmt: skip
    else:
        sens = measure(model, ids[:needed], base, spec_for, bits_menu, layers, prefill_tokens, progress=log)
    choice = allocate(sens, spec_for, target_bits)
    config = base.replace(layer_overrides=overrides(choice, spec_for))
    achieved = config.bits_per_element(num_layers=text.num_hidden_layers)
    return {
        "config": config.to_dict(),
        "calibration": {
            **_slice_record(model, token_ids, start, num_tokens),
            "target_bits_per_element": target_bits,
            "bits_per_element": achieved,
            "bits_menu": list(bits_menu),
            "sensitivity_protocol": f"one layer and tensor kind quantized at a time, {base.sink_tokens} sinks + "
            f"{prefill_tokens} prefilled tokens all quantized (no residual window), mean KL(exact || quantized) "
            f"of the next {score_tokens} predictions",
            "sensitivity": {
                k: {str(layer): {str(b): v for b, v in d.items()} for layer, d in per.items()}
                for k, per in sens.items()
            },  # fmt: skip
            "allocation": {f"{k}.{layer}": b for (k, layer), b in sorted(choice.items())},
            "codebooks": {
                k: {str(layer): {str(b): list(v) for b, v in per.items()} for layer, per in d.items()}
                for k, d in codebooks.items()
            },  # fmt: skip
            "layer_stats": {str(layer): {k: _r(v) for k, v in s.items()} for layer, s in stats.items()},
        },
    }


def _slice(token_ids: torch.Tensor, num_tokens: int) -> tuple[int, torch.Tensor]:
    if token_ids.numel() < num_tokens:
        raise ValueError(f"--tokens: {num_tokens} exceeds the text's {token_ids.numel()} tokens")
    start = token_ids.numel() - num_tokens
    return start, token_ids[start:]


def _slice_record(model: Any, token_ids: torch.Tensor, start: int, num_tokens: int) -> dict:
    """The model fingerprint and the calibration slice, as every calibration file records them."""
    from .bundled import fingerprint

    return {
        "model_fingerprint": fingerprint(model.config),
        "tokens": [start, token_ids.numel()],
        "total_tokens": token_ids.numel(),
        "slice": f"the last {num_tokens} tokens of the text (token ids [{start}, {token_ids.numel()})); "
        "evaluate on windows from the start of the text, which do not overlap it",
    }


def _calibrate_keep_exact(
    model: Any,
    token_ids: torch.Tensor,
    base: CacheConfig,
    num_tokens: int,
    prefill_tokens: int,
    score_tokens: int,
    log: Callable[[str], None],
) -> dict:
    """For a token-policy base: per-layer ``keep_exact`` fractions averaging the base's ``keep_exact``."""
    keep = base.tokens.keep_exact
    if not isinstance(keep, float) or keep <= 0:
        raise ValueError(
            f"tokens.keep_exact: {keep!r}; calibrating a token policy spreads a keep_exact fraction "
            "over layers, allowed: a fraction in (0, 1]"
        )
    start, ids = _slice(token_ids, num_tokens)
    text = model.config.get_text_config(decoder=True)
    layers = list(range(text.num_hidden_layers))
    needed = base.sink_tokens + prefill_tokens + score_tokens
    probes = max(1, ids.numel() // needed)  # consecutive probes of the slice, sensitivities averaged
    sens = {layer: 0.0 for layer in layers}
    for p in range(probes):
        got = layer_sensitivity(model, ids[p * needed : (p + 1) * needed], base, layers, prefill_tokens, log)
        for layer, v in got.items():
            sens[layer] += v / probes
    per_layer = keep_exact_by_layer(sens, keep)
    config = base.replace(tokens=replace(base.tokens, layer_keep_exact=per_layer))
    return {
        "config": config.to_dict(),
        "calibration": {
            **_slice_record(model, token_ids, start, num_tokens),
            "mean_keep_exact": config.tokens.mean_keep_exact(len(layers)),
            "sensitivity_protocol": f"one layer at a time, its keys then its values quantized with the preset's "
            f"specs, {base.sink_tokens} sinks + {prefill_tokens} prefilled tokens all quantized (no residual "
            f"window), mean KL(exact || quantized) of the next {score_tokens} predictions, summed per layer, "
            f"averaged over {probes} consecutive probe(s) of the slice; "
            f"keep_exact per layer = min(1, c * sensitivity ** {KEEP_EXACT_POWER}), c chosen so the layers "
            "average the preset's keep_exact",
            "sensitivity": {str(layer): v for layer, v in sens.items()},
            "layer_keep_exact": {str(layer): f for layer, f in per_layer.items()},
        },
    }


def save(data: dict, path: str | Path, model_name: str, text_file: str) -> Path:
    """Write a calibration file (the model and text recorded beside the config)."""
    data["calibration"] = {"model": model_name, "text_file": str(text_file), **data["calibration"]}
    return _write(data, path)


def _write(data: dict, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    return out
