"""Orthogonal rotations of the head dimension (QuaRot / llama.cpp style), seeded and exact.

A rotation ``Q`` (head_dim, head_dim) is applied to keys or values as ``x @ Q`` (shape
(batch, kv_heads, tokens, head_dim)) before quantization and undone with ``x @ Q.T``. Since
``Q @ Q.T == I``, attention scores ``q @ k.T == (q @ Q) @ (k @ Q).T`` are unchanged: only the
quantization error differs. Rotating spreads a few large channels over all channels, which
flattens the per-token range that per-token groups must cover.

* power-of-two sizes: a randomized Hadamard matrix ``H @ diag(signs) / sqrt(n)`` (Sylvester
  construction; entries are exactly +-1/sqrt(n));
* other sizes: a seeded random orthogonal matrix (QR of a Gaussian matrix, signs fixed).
"""

from __future__ import annotations

import functools

import torch


def sylvester_hadamard(size: int) -> torch.Tensor:
    """The (size, size) +-1 Hadamard matrix of Sylvester's construction; ``size`` a power of two."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"size: {size} must be a power of two for a Sylvester Hadamard matrix")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def rotation_matrix(size: int, seed: int = 0) -> torch.Tensor:
    """Seeded orthogonal (size, size) float32 matrix: randomized Hadamard for powers of two, else
    a random orthogonal matrix. The same (size, seed) always gives the same matrix."""
    if size < 1:
        raise ValueError(f"head_dim: {size} must be a positive integer")
    gen = torch.Generator().manual_seed(seed)
    if size & (size - 1) == 0:
        signs = torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1
        q = sylvester_hadamard(size) * signs / size**0.5
    else:
        a = torch.randn(size, size, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))
    return q.float()


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ q`` for ``x`` (..., head_dim), computed in float32, returned in ``x``'s dtype."""
    return (x.float() @ q.to(x.device)).to(x.dtype)


def unrotate_(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """In place: ``x <- x @ q.T`` (the inverse of `rotate`); returns ``x``."""
    return x.copy_(x.float() @ q.to(x.device).T)
