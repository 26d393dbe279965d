"""Keys and values of every layer for a calibration text, as the cache would store them.

`capture` runs the model once over ``token_ids`` with an exact `DynamicCache` and returns each
full-attention layer's keys and values (1, kv_heads, tokens, head_dim) in float32. With
``pre_rope`` (a `Rope`) the keys are brought back before the rotary embedding at their cache
positions, as pre-RoPE key quantization sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..quant.rope import Rope


@dataclass
class Captured:
    """Per layer (model layer index -> tensor (1, kv_heads, tokens, head_dim), float32)."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]


def capture(model: Any, token_ids: torch.Tensor, pre_rope: Rope | None = None) -> Captured:
    """One forward of ``token_ids`` (tokens,) with an exact cache; its full-attention K/V."""
    from transformers import DynamicCache

    if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1 or token_ids.numel() == 0:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids: {shape}; allowed: a tensor of shape (tokens,) with at least one token")

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(
            input_ids=token_ids[None].to(model.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    keys, values = {}, {}
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None:
            continue
        k = layer.keys.float().cpu()
        keys[index] = pre_rope.apply(k, 0, inverse=True) if pre_rope is not None else k
        values[index] = layer.values.float().cpu()
    return Captured(keys, values)
