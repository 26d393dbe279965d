"""Per-layer codebooks fitted on calibration keys and values (Lloyd-Max in the quantization domain).

Each layer's keys (pre-RoPE when the config says so) and values (rotated when it says so) are
grouped and normalized exactly as an ``"nf"`` spec normalizes them — ``(x - zero) / scale`` per
group, so samples lie in [-1, 1] — and `codebook.lloyd_max` fits the levels minimizing their
squared error. The codebook then rides in that layer's `QuantSpec` (``codebook=...``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..quant.codebook import lloyd_max
from ..quant.primitives import choose_qparams, grouped
from ..quant.rotation import rotate, rotation_matrix
from ..quant.spec import QuantSpec

MAX_SAMPLES = 200_000


def normalized_samples(x: torch.Tensor, spec: QuantSpec, seed: int = 0) -> torch.Tensor:
    """1-D samples of ``x`` (1, kv_heads, tokens, head_dim) normalized to [-1, 1] by ``spec``'s groups
    (tokens cut to whole groups), at most ``MAX_SAMPLES`` (a seeded subsample)."""
    nf = replace(spec, format="nf", codebook=None, outlier_fraction=0.0)
    if nf.axis.value == "channel":
        x = x[:, :, : x.shape[-2] // nf.group_size * nf.group_size]
    scale, zero = choose_qparams(x, nf)
    g = grouped(x.float(), nf)
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    samples = (g / scale.float().unsqueeze(-1)).flatten()
    if samples.numel() > MAX_SAMPLES:
        pick = torch.randperm(samples.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_SAMPLES]
        samples = samples[pick]
    return samples


def fit_codebook(x: torch.Tensor, spec: QuantSpec, rotated: bool = False, seed: int = 0) -> tuple[float, ...]:
    """Lloyd-Max levels of ``spec.bits`` bits for ``x`` (1, kv_heads, tokens, head_dim) grouped as ``spec``."""
    if rotated:
        x = rotate(x.float(), rotation_matrix(x.shape[-1], seed))
    return lloyd_max(normalized_samples(x, spec, seed), spec.bits)
