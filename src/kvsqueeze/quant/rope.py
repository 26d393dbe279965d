"""Rotary position embedding (the ``rotate_half`` convention of Llama-family models), undone and redone.

Pre-RoPE key quantization (KVQuant) stores keys as they were before the rotary embedding: their
outlier channels stay fixed instead of being mixed pairwise with a position-dependent angle.
Keys reach the cache already rotated, so `Rope.apply` with ``inverse=True`` undoes it at the
token's position before quantization and ``inverse=False`` redoes it when the keys are read.

For a key ``k`` (..., head_dim) at position ``p``: ``rope(k) = k * cos + rotate_half(k) * sin``
with ``cos``/``sin`` of ``p * inv_freq`` repeated over both halves; the inverse uses ``-sin``.
Both are exact rotations, so the round trip only costs float32 rounding (~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class Rope:
    """Standard RoPE with ``inv_freq`` (head_dim / 2,) float32 (no attention scaling)."""

    inv_freq: torch.Tensor

    @staticmethod
    def default(head_dim: int, theta: float) -> Rope:
        """The original RoPE: ``inv_freq = theta ** (-2i / head_dim)``."""
        return Rope(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)))

    def cos_sin(self, start: int, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (num_tokens, head_dim), float32, for positions ``start .. start + num_tokens - 1``."""
        pos = torch.arange(start, start + num_tokens, device=device, dtype=torch.float)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (..., head_dim), float32, at the int ``positions`` (...)."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, start: int | torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE (or its inverse) of ``x`` (batch, kv_heads, tokens, head_dim) whose token 0 is at
        position ``start``, or whose tokens are at the positions ``start`` (batch, kv_heads, tokens)
        int; a new tensor in ``x``'s dtype."""
        if isinstance(start, torch.Tensor):
            cos, sin = self.cos_sin_at(start.to(x.device))
        else:
            cos, sin = self.cos_sin(start, x.shape[-2], x.device)
        xf = x.float()
        out = xf * cos + rotate_half(xf) * (-sin if inverse else sin)
        return out.to(x.dtype)
