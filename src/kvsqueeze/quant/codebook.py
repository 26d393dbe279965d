"""Non-uniform codes: fixed normal-quantile codebooks (NF2/NF3/NF4) and Lloyd-Max fitted ones.

A codebook is ``2**bits`` increasing levels in [-1, 1]. A group of elements is normalized to
[-1, 1] by its scale (and zero point), each element takes the index of its nearest level, and the
indices are bit-packed like integer codes (`packing`). Dequantization is a table lookup followed
by the usual ``x = level * scale + zero``.

* `normal_float` — NF-style fixed levels: quantiles of a standard normal at ``(i + 1/2) / n``,
  rescaled so that the outermost levels are exactly -1 and 1 (the group's min and max, which
  every min-max normalized group contains, are then coded exactly);
* `lloyd_max` — levels fitted to samples of normalized values (k-means in one dimension,
  minimizing the mean squared error), for per-layer codebooks fitted on calibration text.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def normal_float(bits: int) -> tuple[float, ...]:
    """The NF codebook of ``bits`` bits (2, 3 or 4): ``2**bits`` increasing levels, ends at -1 and 1."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits: {bits!r} is not supported for codebooks; allowed: (2, 3, 4)")
    n = 2**bits
    normal = torch.distributions.Normal(0.0, 1.0)
    q = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    q = q / q.abs().max()
    return tuple(round(float(v), 6) for v in q)


def check_codebook(levels: tuple[float, ...], bits: int, field: str = "codebook") -> None:
    """Raise unless ``levels`` are ``2**bits`` finite, strictly increasing floats in [-1, 1]."""
    n = 2**bits
    if len(levels) != n:
        raise ValueError(f"{field}: {len(levels)} levels given; {bits} bits need exactly {n}")
    if any(not math.isfinite(v) or abs(v) > 1 for v in levels):
        raise ValueError(f"{field}: {levels!r} has levels outside [-1, 1]; allowed: finite values in [-1, 1]")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"{field}: {levels!r} must be strictly increasing")


def encode(normalized: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest level for every element of ``normalized`` (any shape)."""
    bounds = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(normalized.contiguous(), bounds.to(normalized.device)).to(torch.uint8)


def lloyd_max(
    samples: torch.Tensor, bits: int, iterations: int = 40, init: tuple[float, ...] | None = None
) -> tuple[float, ...]:
    """Levels of ``bits`` bits minimizing the squared error of ``samples`` (1-D, values in [-1, 1]).

    Starts from ``init`` (default the NF codebook) and alternates nearest-level assignment and
    centroid update; empty cells keep their level. Levels are clamped to [-1, 1] and kept strictly
    increasing so the result is a valid codebook.
    """
    x = samples.flatten().float().clamp(-1, 1)
    levels = torch.tensor(init or normal_float(bits), dtype=torch.float)
    n = levels.numel()
    for _ in range(iterations):
        idx = encode(x, levels).long()
        sums = torch.zeros(n).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=n).float()
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
    levels, _ = levels.clamp(-1, 1).sort()
    for i in range(1, n):  # keep strictly increasing (ties can only come from empty cells)
        if levels[i] <= levels[i - 1]:
            levels[i] = levels[i - 1] + 1e-4
    return tuple(round(float(v), 6) for v in levels.clamp(-1, 1))
