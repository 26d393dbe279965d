"""`ExactBuffer`: a preallocated, bounded buffer of exact tokens (sinks or the residual window)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ExactBuffer:
    """Up to ``capacity`` tokens of shape (batch, kv_heads, tokens, head_dim), kept exact.

    The storage is allocated once, on first write, at full capacity.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: torch.Tensor | None = None
        self.num_tokens = 0

    def view(self) -> torch.Tensor | None:
        """The held tokens (a view), or None when empty."""
        return None if self.data is None or self.num_tokens == 0 else self.data[:, :, : self.num_tokens]

    def _ensure(self, like: torch.Tensor) -> torch.Tensor:
        if self.data is None:
            b, h, _, d = like.shape
            self.data = torch.empty(b, h, self.capacity, d, dtype=like.dtype, device=like.device)
        return self.data

    def append(self, x: torch.Tensor) -> None:
        """Add ``x`` (batch, kv_heads, n, head_dim) after the held tokens."""
        n = x.shape[-2]
        assert self.num_tokens + n <= self.capacity, "exact buffer overflow"
        if n:
            self._ensure(x)[:, :, self.num_tokens : self.num_tokens + n].copy_(x)
            self.num_tokens += n

    def assign(self, x: torch.Tensor) -> None:
        """Replace the held tokens by ``x`` (batch, kv_heads, n, head_dim)."""
        self.num_tokens = 0
        self.append(x)

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    def clear(self) -> None:
        self.data = None
        self.num_tokens = 0
