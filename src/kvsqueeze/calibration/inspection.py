"""`inspect_model`: what ``kvsqueeze inspect`` reports (per-layer stats, per-preset errors, safe preset)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import PRESETS
from ..integrations.rope import rope_for
from .capture import capture
from .risk import UNSAFE, check_config, profiles_from_weights
from .stats import layer_stats, relative_error


def inspect_model(model: Any, token_ids: torch.Tensor) -> dict:
    """Stats of every full-attention layer on ``token_ids`` (tokens,) and, for every quantized preset,
    the worst relative error of keys and values over layers; a preset is safe when both stay below
    `risk.UNSAFE`. ``safe_preset`` is the safe preset with the fewest bits per element."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope, _ = rope_for(text, head_dim)
    post = capture(model, token_ids)
    pre = capture(model, token_ids, rope) if rope is not None else post
    layers = {str(i): layer_stats(pre.keys[i], pre.values[i]) for i in sorted(pre.keys)}
    weights = profiles_from_weights(model)
    presets = {}
    for name, cfg in PRESETS.items():
        if cfg.is_exact:
            continue
        keys = pre.keys if (cfg.pre_rope_keys and rope is not None) else post.keys
        k_err = max(relative_error(keys[i], cfg.key, cfg.rotate_keys, cfg.rotation_seed) for i in keys)
        v_err = max(
            relative_error(pre.values[i], cfg.value, cfg.rotate_values, cfg.rotation_seed) for i in keys
        )
        inv_freq = None if rope is None or cfg.pre_rope_keys else rope.inv_freq
        presets[name] = {
            "bits_per_element": cfg.bits_per_element(),
            "key_error": k_err,
            "value_error": v_err,
            "predicted_unsafe": bool(check_config(weights, cfg, inv_freq)),
            "safe": k_err <= UNSAFE and v_err <= UNSAFE,
        }
    safe = [n for n, r in presets.items() if r["safe"]]
    best = min(safe, key=lambda n: presets[n]["bits_per_element"]) if safe else "none"
    return {"pre_rope": rope is not None, "layers": layers, "presets": presets, "safe_preset": best}
