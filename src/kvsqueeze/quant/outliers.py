"""Dense-and-sparse outliers (KVQuant): the most extreme entries of a block kept exact, aside.

Per block of ``outlier_tokens`` tokens of one head (``outlier_tokens * head_dim`` entries), the
``count`` entries that lie furthest from their quantization group's median — measured in units
of the group's mean absolute deviation, so a wide channel is not mistaken for an outlier — are
taken out before the scales are chosen (they no longer stretch their group's range), replaced
by the group median in the dense tensor, and stored exactly in a side store:

* ``index``: int16 (batch, kv_heads, tokens / outlier_tokens, count), the flat position
  ``token_in_block * head_dim + channel`` inside the block;
* ``value``: ``spec.outlier_value_dtype`` (float16, float32 with float32 metadata; same shape),
  the original entries.

After the dense part is dequantized, `restore_` writes the exact entries back.
"""

from __future__ import annotations

import math

import torch

from .primitives import grouped
from .spec import QuantSpec

INDEX_DTYPE = torch.int16


def outlier_count(fraction: float, outlier_tokens: int, head_dim: int) -> int:
    """Entries kept exact per block: ``ceil(fraction * outlier_tokens * head_dim)``."""
    return math.ceil(fraction * outlier_tokens * head_dim - 1e-9)


def split_outliers(
    x: torch.Tensor, spec: QuantSpec, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, index, value) for ``x`` (batch, kv_heads, tokens, head_dim), float32; ``value`` is
    float32 too (the caller stores it in ``spec.outlier_value_dtype``, see `PackedTensor`).

    Entries are scored within the quantization groups of ``spec`` (`primitives.grouped`);
    ``dense`` is a copy of ``x`` with the ``count`` top-scored entries of every block replaced by
    their group's median.
    """
    b, h, t, d = x.shape
    blocks = t // spec.outlier_tokens
    groups = grouped(x, spec)
    med = groups.median(-1, keepdim=True).values
    dev = (groups - med).abs()
    score, fill = torch.empty_like(x), torch.empty_like(x)
    grouped(score, spec).copy_(dev / dev.mean(-1, keepdim=True).clamp_min(1e-12))
    grouped(fill, spec).copy_(med.expand_as(groups))
    index = score.reshape(b, h, blocks, -1).topk(count, dim=-1, sorted=False).indices
    dense = x.reshape(b, h, blocks, -1).clone()
    value = dense.gather(-1, index)
    dense.scatter_(-1, index, fill.reshape(b, h, blocks, -1).gather(-1, index))
    return dense.reshape(b, h, t, d), index.to(INDEX_DTYPE), value


def restore_(
    out: torch.Tensor, index: torch.Tensor, value: torch.Tensor, outlier_tokens: int
) -> torch.Tensor:
    """In place: write the exact entries back into ``out`` (batch, kv_heads, tokens, head_dim), which
    may be any strided view (e.g. a slice of the reference path's workspace)."""
    b, h, t, d = out.shape
    five = out.unflatten(-2, (t // outlier_tokens, outlier_tokens))  # a view for any strides
    idx = index.long()
    bi = torch.arange(b, device=out.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=out.device).view(1, h, 1, 1)
    ki = torch.arange(idx.shape[2], device=out.device).view(1, 1, -1, 1)
    five[bi, hi, ki, idx // d, idx % d] = value.to(out.dtype)
    return out
