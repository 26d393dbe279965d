"""`calibrate`: statistics, codebooks and a per-layer bit allocation for one model, saved as JSON.

The calibration slice is the LAST ``num_tokens`` tokens of the text (evaluation windows are taken
from its start, so the two never overlap as long as the text holds more than
``num_tokens + evaluated tokens``); the file records the slice. The saved file is
``{"model": <model_fingerprint>, "config": <CacheConfig dict with layer_overrides>,
"calibration": {...}}``; `CacheConfig.load` (or any ``--kv``/``--methods`` accepting
``<file>.json``) reads its ``config``, which is exactly the config the calibration selected, with
the ``"model"`` fingerprint as its ``model_fingerprint`` (refused on another model).

`calibrate` checks its arguments (`checks`) before any forward; ``kvsqueeze calibrate`` runs the
same checks on its flags before it loads the model.
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
from .checks import (
    BITS_MENU,
    NUM_TOKENS,
    PREFILL_TOKENS,
    SCORE_TOKENS,
    Codebooks,
    check_bits_menu,
    check_keep_exact,
    check_positive,
    check_sizes,
    check_target_bits,
    effective_base,
    model_fingerprint,
    reused_calibration,
)
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
    bits_menu: tuple[int, ...] = BITS_MENU,
    num_tokens: int = NUM_TOKENS,
    prefill_tokens: int = PREFILL_TOKENS,
    score_tokens: int = SCORE_TOKENS,
    log: Callable[[str], None] = print,
    reuse: dict | None = None,
) -> dict:
    """The calibration file's content for ``model`` (see module docstring).

    ``reuse``: the ``"calibration"`` entry of an earlier file with the same base, slice and bits;
    its codebooks and sensitivities (of the widths in ``bits_menu``) are taken as they are and only
    the allocation is redone (for another ``target_bits``); ``prefill_tokens`` and ``score_tokens``
    are not used, the file keeps the earlier sensitivity protocol."""
    if base.tokens is not None:
        if reuse is not None:
            raise ValueError("reuse: a token-policy calibration has no bit allocation to redo; allowed: None")
        return _calibrate_keep_exact(model, token_ids, base, num_tokens, prefill_tokens, score_tokens, log)
    if base.key is None or base.value is None or base.layer_overrides:
        raise ValueError("preset: calibration needs a base config with key and value specs and no overrides")
    head_dim = model_fingerprint(model.config)["head_dim"]
    check_bits_menu(bits_menu, base, head_dim)
    if reuse is None:
        check_sizes(num_tokens, prefill_tokens, score_tokens, base)
    check_positive(num_tokens, "num_tokens")
    base, note = effective_base(base, model.config)
    if note:
        log(note)
    check_target_bits(target_bits, base, bits_menu)
    start, ids = _slice(token_ids, num_tokens)
    text = model.config.get_text_config(decoder=True)
    rope = rope_for(text, head_dim)[0] if base.pre_rope_keys else None
    reused = None if reuse is None else reused_calibration(reuse, bits_menu)
    got = capture(model, ids, rope)
    layers = sorted(got.keys)
    if reused is not None and sorted(reused[0]["key"]) != layers:
        raise ValueError(
            f"reuse: its sensitivities cover layers {sorted(reused[0]['key'])}; this model's full-attention "
            f"layers are {layers}; allowed: a calibration of this model"
        )
    stats = {layer: layer_stats(got.keys[layer], got.values[layer]) for layer in layers}
    codebooks: Codebooks = {"key": {}, "value": {}} if reused is None else reused[1]
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
    if reused is not None:
        sens = reused[0]
        protocol = reuse["sensitivity_protocol"]
    else:
        sens = measure(model, ids[:needed], base, spec_for, bits_menu, layers, prefill_tokens, progress=log)
        protocol = (
            f"one layer and tensor kind quantized at a time, {base.sink_tokens} sinks + {prefill_tokens} "
            f"prefilled tokens all quantized (no residual window), mean KL(exact || quantized) of the next "
            f"{score_tokens} predictions"
        )
    choice = allocate(sens, spec_for, target_bits)
    fingerprint = model_fingerprint(model.config)
    config = base.replace(layer_overrides=overrides(choice, spec_for), model_fingerprint=fingerprint)
    achieved = config.bits_per_element(num_layers=text.num_hidden_layers)
    return {
        "model": fingerprint,
        "config": config.to_dict(),
        "calibration": {
            **_slice_record(model, token_ids, start, num_tokens),
            "target_bits_per_element": target_bits,
            "bits_per_element": achieved,
            "bits_menu": list(bits_menu),
            "sensitivity_protocol": protocol,
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
    if token_ids.ndim != 1:
        raise ValueError(
            f"token_ids: shape {tuple(token_ids.shape)}; allowed: one row of ids, shape (tokens,)"
        )
    if token_ids.numel() < num_tokens:
        raise ValueError(
            f"num_tokens: {num_tokens} exceeds the text's {token_ids.numel()} tokens; "
            f"allowed: 1 to {token_ids.numel()}"
        )
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
    check_keep_exact(base)
    check_sizes(num_tokens, prefill_tokens, score_tokens, base)
    keep = base.tokens.keep_exact
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
    fingerprint = model_fingerprint(model.config)
    config = base.replace(
        tokens=replace(base.tokens, layer_keep_exact=per_layer), model_fingerprint=fingerprint
    )
    return {
        "model": fingerprint,
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
    """Write a calibration file (the model name and text file recorded in its ``calibration``)."""
    data["calibration"] = {"model": model_name, "text_file": str(text_file), **data["calibration"]}
    return _write(data, path)


def _write(data: dict, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    return out
