"""The rotary embedding of a transformers model, when pre-RoPE key quantization can use it.

Pre-RoPE keys need the exact RoPE the model applied: the ``rotate_half`` convention of the Llama
family over the whole head, and a rotation without attention scaling. `rope_for` returns it for
model types known to follow that convention with a static rope type (``default``, ``linear``,
``llama3``), and None with the reason otherwise (the cache then keeps post-RoPE keys).
"""

from __future__ import annotations

from typing import Any

import torch

from ..quant.rope import Rope

STANDARD_ROPE_MODELS = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite", "olmo", "olmo2",
)  # fmt: skip
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def rope_for(text_config: Any, head_dim: int) -> tuple[Rope | None, str]:
    """(`Rope`, "") for a model with standard RoPE, else (None, why pre-RoPE keys are not possible)."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in STANDARD_ROPE_MODELS:
        return (
            None,
            f"model_type {model_type!r} is not among the standard-RoPE families {STANDARD_ROPE_MODELS}",
        )
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return None, f"rope_type {rope_type!r} is not supported; allowed: {STATIC_ROPE_TYPES}"
    if params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", 1.0)) != 1.0:
        return None, "partial rotary embeddings are not supported"
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if rope_type == "default":
        if theta is None:
            return None, "rope_theta is missing from the model config"
        return Rope.default(head_dim, float(theta)), ""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config, torch.device("cpu"))
    if float(scaling) != 1.0 or inv_freq.numel() * 2 != head_dim:
        return None, f"rope_type {rope_type!r} scales attention or does not cover the head"
    return Rope(inv_freq.float()), ""
