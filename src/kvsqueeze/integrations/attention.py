"""``attn_implementation="kvsqueeze"``: transformers' attention seam for the fused read path.

`register` adds the attention function (and transformers' SDPA mask builder under the same name)
to transformers' public `AttentionInterface` / `AttentionMaskInterface`. It is explicit and
idempotent; `kvsqueeze.load_model(attn_implementation="kvsqueeze")` and `SqueezedCache.from_model`
call it lazily. Nothing is registered at import.

The function reads the `AttentionParts` behind the `PackedKV` keys a fused `SqueezedLayer`
returns. Ordinary tensors (exact caches, sliding-window layers, no cache), unsupported options
(dropout, soft-capping, attention-sink logits, position bias) and devices without a kernel go to
transformers' own SDPA function, on dequantized keys and values where needed (the reference path).
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention.fused import fused_attention, fused_backend
from ..attention.packed_view import PackedKV, parts_of

NAME = "kvsqueeze"
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "sinks")


def register() -> None:
    """Make ``attn_implementation="kvsqueeze"`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, kvsqueeze_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fused_attention(model: Any) -> None:
    """Register the kvsqueeze attention and switch ``model`` to it (a no-op when it already uses it).

    The kvsqueeze attention runs transformers' SDPA for anything but fused `SqueezedCache` layers,
    so other caches on the same model compute what they computed with ``"sdpa"``.
    """
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.dense() if isinstance(x, PackedKV) else x


def kvsqueeze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (batch, q_heads, q_len, head_dim), key and value
    (batch, kv_heads, kv_len, head_dim) -> ((batch, q_len, q_heads, head_dim), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    parts = owner = parts_of(key)
    if parts is not None and not parts.history:  # prefill of an empty cache: plain SDPA on the new tokens
        key, value = parts.new.key.values, parts.new.value.values
        parts = None
    backend = None if parts is None else fused_backend(query.device)
    unsupported = dropout or any(kwargs.get(k) is not None for k in UNSUPPORTED_KWARGS)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if parts is None or backend is None or unsupported or kwargs.get("output_attentions"):
        key, value = _dense(key), _dense(value)
        out = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = fused_attention(query, parts, attention_mask, scale, bool(causal), backend), None
    if owner is not None:  # token policies score and settle the new tokens after the read
        owner.finish(query, scale)
    return out
