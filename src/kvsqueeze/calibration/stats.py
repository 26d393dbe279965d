"""Per-layer / per-channel statistics of keys and values, and the quantization error of a spec on them.

`layer_stats` summarizes one layer: absolute maxima, the per-channel absolute maxima of the keys,
the outlier channels (those whose maximum exceeds ``OUTLIER_RATIO`` times the median channel's)
and the value range. `relative_error` quantizes a tensor as a cache page would (transform, codes,
outliers) and returns ``||x - x^|| / ||x - channel mean||``, the number the risk check compares with
its threshold (a constant per-channel offset adds the same to every score of a query).
"""

from __future__ import annotations

import torch

from ..quant.packed import PackedTensor
from ..quant.rotation import rotate, rotation_matrix
from ..quant.spec import QuantSpec

OUTLIER_RATIO = 4.0


def layer_stats(key: torch.Tensor, value: torch.Tensor) -> dict:
    """Statistics of one layer's ``key`` and ``value`` (1, kv_heads, tokens, head_dim)."""
    channel_max = key.abs().amax(dim=(0, 2))  # (kv_heads, head_dim)
    median = channel_max.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    outliers = (channel_max / median > OUTLIER_RATIO).nonzero().tolist()
    return {
        "key_absmax": key.abs().max().item(),
        "key_channel_mean": key.mean(dim=(0, 2)).tolist(),
        "key_channel_absmax": channel_max.tolist(),
        "key_channel_ratio": (channel_max / median).max().item(),
        "key_outlier_channels": [[h, c] for h, c in outliers],
        "value_absmax": value.abs().max().item(),
        "value_std": value.std().item(),
    }


def relative_error(x: torch.Tensor, spec: QuantSpec, rotated: bool = False, seed: int = 0) -> float:
    """``||x - dequant(quant(x))|| / ||x||`` for ``x`` (1, kv_heads, tokens, head_dim), tokens cut to a
    multiple of 128, quantized as one page of ``spec`` (after a rotation when ``rotated``)."""
    t = x.shape[-2] // 128 * 128
    x = x[:, :, :t].float()
    if rotated:
        x = rotate(x, rotation_matrix(x.shape[-1], seed))
    back = PackedTensor.from_float(x, spec).dequantize()
    signal = (x - x.mean(dim=-2, keepdim=True)).norm()  # per-channel offsets do not reach softmax
    return ((x - back).norm() / signal.clamp_min(1e-12)).item()
