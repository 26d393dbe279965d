"""Per-layer / per-channel statistics of keys and values.

`layer_stats` summarizes one layer: absolute maxima, the per-channel absolute maxima of the keys,
the outlier channels (those whose maximum exceeds ``OUTLIER_RATIO`` times the median channel's)
and the value range. The error a config makes on them is the risk check's (`risk.assess`).
"""

from __future__ import annotations

import torch

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
