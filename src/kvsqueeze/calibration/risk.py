"""Model risk check: predicted quantization error of keys and values, from weights or from data.

A `ChannelProfile` describes one layer's keys (or values) per channel: the spread ``std``
(batch, kv_heads, head_dim) -> (kv_heads, head_dim) and the constant offset ``mean`` (e.g. a
``k_proj`` bias, as in Qwen2.5). From it, `predicted_error` estimates the error of a spec relative
to the *varying* part of the signal — a constant per-channel offset of the keys only adds the same
number to every attention score of a query, which softmax ignores:

* per-channel groups of ``g`` tokens see a range of ``6 std`` plus, for post-RoPE keys, the chord
  the RoPE rotation sweeps in ``g`` positions over the channel pair's offset (pre-RoPE: none);
* per-token groups see the spread across channels: ``2 max(|mean| + 3 std)``; after a Hadamard
  rotation the offsets and spreads are mixed evenly over all channels;
* the error of a ``b``-bit uniform grid is ``range / (2**b - 1) / sqrt(12)`` per element.

A layer whose predicted relative error exceeds ``UNSAFE`` (quantization noise twice the signal)
is reported unsafe: that is where a cache turns into silent garbage. (The estimate is coarse —
plain 2-bit KIVI predicts up to ~1.6 on SmolLM2 and is degraded, not garbage — hence 2, not 1.) `profiles_from_weights` reads
the profile off a Llama-style model (``std_c = ||W_k[c] * norm_weight||``, unit-variance inputs
assumed), which is what `SqueezedCache.from_model` checks; `profiles_from_data` measures it on
captured keys/values (``kvsqueeze inspect``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CacheConfig
from ..quant.spec import Axis, QuantSpec

UNSAFE = 2.0


@dataclass(frozen=True)
class ChannelProfile:
    """Per-channel spread and offset, each (kv_heads, head_dim) float32."""

    std: torch.Tensor
    mean: torch.Tensor


def predicted_error(
    profile: ChannelProfile, spec: QuantSpec, rotated: bool, inv_freq: torch.Tensor | None = None
) -> float:
    """Predicted ``||error|| / ||x - mean||`` of ``spec``; ``inv_freq`` (head_dim/2,) for post-RoPE keys."""
    std, mean = profile.std.float(), profile.mean.float()
    if rotated:  # an orthogonal mix: every channel carries the average energy
        std = std.pow(2).mean(-1, keepdim=True).sqrt().expand_as(std)
        mean = mean.pow(2).mean(-1, keepdim=True).sqrt().expand_as(mean)
    steps = 2**spec.bits - 1 if not spec.is_fp8 else 2**4  # FP8: ~4 significand bits of relative error
    if spec.axis is Axis.CHANNEL:
        span = 6 * std
        if inv_freq is not None and not rotated:
            half = std.shape[-1] // 2
            pair = torch.sqrt(mean[..., :half] ** 2 + mean[..., half:] ** 2)
            chord = pair * torch.clamp(spec.group_size * inv_freq.float(), max=2.0)
            span = span + torch.cat([chord, chord], -1)
        err = span / steps / math.sqrt(12)
    else:
        span = 2 * (mean.abs() + 3 * std).amax(-1, keepdim=True)
        err = (span / steps / math.sqrt(12)).expand_as(std)
    signal = profile.std.float().pow(2).mean().sqrt().clamp_min(1e-12)
    return (err.pow(2).mean().sqrt() / signal).item()


def check_config(
    profiles: dict[int, tuple[ChannelProfile, ChannelProfile]],
    config: CacheConfig,
    inv_freq: torch.Tensor | None,
) -> list[str]:
    """Warnings for the layers where ``config`` is predicted unsafe (empty: predicted safe).

    ``profiles`` maps a layer index to its (keys, values) profiles; ``inv_freq`` is the model's RoPE
    (None: no RoPE, or keys stored pre-RoPE)."""
    problems = []
    for layer, (keys, values) in profiles.items():
        cfg = config.for_layer(layer)
        for kind, spec, prof, rot, freq in (
            ("keys", cfg.key, keys, cfg.rotate_keys, None if cfg.pre_rope_keys else inv_freq),
            ("values", cfg.value, values, cfg.rotate_values, None),
        ):
            if spec is None:
                continue
            err = predicted_error(prof, spec, rot, freq)
            if err > UNSAFE:
                problems.append(f"layer {layer} {kind}: predicted relative error {err:.2f} > {UNSAFE}")
    return problems


def profiles_from_weights(model: Any) -> dict[int, tuple[ChannelProfile, ChannelProfile]]:
    """Profiles of a Llama-style decoder (``model.model.layers[i].self_attn.{k,v}_proj`` after
    ``input_layernorm``); an empty dict for other layouts (nothing is predicted)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    out = {}
    for index, layer in enumerate(layers or []):
        attn, norm = getattr(layer, "self_attn", None), getattr(layer, "input_layernorm", None)
        if (
            attn is None
            or norm is None
            or not hasattr(attn, "k_proj")
            or getattr(attn, "k_norm", None) is not None
        ):
            return {}
        with torch.no_grad():
            scale = norm.weight.float()
            pair = []
            for proj in (attn.k_proj, attn.v_proj):
                w = proj.weight.float() * scale
                std = w.norm(dim=-1).view(heads, -1)
                bias = proj.bias.float().view(heads, -1) if proj.bias is not None else torch.zeros_like(std)
                pair.append(ChannelProfile(std, bias))
        out[index] = (pair[0], pair[1])
    return out


def profiles_from_data(keys: torch.Tensor, values: torch.Tensor) -> tuple[ChannelProfile, ChannelProfile]:
    """Profiles of captured pre-RoPE ``keys`` and ``values`` (1, kv_heads, tokens, head_dim)."""
    return (
        ChannelProfile(keys.std(dim=(0, 2)), keys.mean(dim=(0, 2))),
        ChannelProfile(values.std(dim=(0, 2)), values.mean(dim=(0, 2))),
    )
