"""Buffers of exact tokens (batch, kv_heads, tokens, head_dim): sinks, windows, staging, exact class.

`ExactBuffer` has two allocation modes:

* whole (``step=None``): the storage is allocated once, on first write, at full ``capacity``; no
  allocation during decoding (sinks and the window of plain caches, which fill up anyway);
* stepped (``step=k``): the storage holds the tokens rounded up to ``k``, grows by reallocation and
  shrinks when `assign` holds fewer tokens. Buffers whose fill level swings (the window and staging
  of a token-policy store, ``step=1``) then hold, and report, the bytes of the tokens they keep; a
  reallocation copies at most ``capacity`` tokens.

`ExactChunks` holds exact tokens without a bound (the exact class of a token-policy store): a
stepped tail buffer frozen as a chunk once it reaches ``chunk_tokens``, so a copy never exceeds one
chunk and no chunk holds unused rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .state import StateDict, StateError, dtype_name, dtype_of


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class ExactBuffer:
    """Up to ``capacity`` tokens (None: unbounded, needs ``step``) of shape (batch, kv_heads, tokens,
    head_dim), kept exact."""

    def __init__(
        self, capacity: int | None, step: int | None = None, shrink: bool = True, name: str = "exact buffer"
    ) -> None:
        if capacity is None and step is None:
            raise ValueError("ExactBuffer: an unbounded buffer needs a step")
        self.capacity = capacity
        self.step = step
        self.shrink = shrink
        self.name = name
        self.dtype: torch.dtype | None = None  # storage dtype; None: the dtype of what is written
        self.data: torch.Tensor | None = None
        self.num_tokens = 0

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        """Store tokens in ``dtype`` (e.g. float16 for a float32 model); held tokens are converted,
        unless some leave ``dtype``'s range: the buffer then keeps theirs (warned, as `append`)."""
        self.dtype = dtype
        if self.data is not None and dtype is not None and self.data.dtype != dtype:
            self._fit_dtype(self.data[:, :, : self.num_tokens])
            if self.data.dtype != self.dtype:
                self.data = self.data.to(self.dtype)

    def _fit_dtype(self, x: torch.Tensor) -> None:
        """Keep the input's dtype from now on when ``x`` leaves the storage dtype's finite range
        (float16 holds +-65504): rounding it to inf would corrupt attention (warned once)."""
        if self.dtype is None or self.dtype == x.dtype or not x.dtype.is_floating_point:
            return
        limit = torch.finfo(self.dtype).max
        if x.numel() and bool((x.abs() > limit).any() & torch.isfinite(x).all()):
            warnings.warn(
                f"{self.name}: exact values up to {float(x.abs().max()):.4g} exceed {self.dtype} "
                f"(max {limit:.4g}); keeping them in {x.dtype} from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            self.set_dtype(x.dtype)

    def view(self) -> torch.Tensor | None:
        """The held tokens (a view), or None when empty."""
        return None if self.data is None or self.num_tokens == 0 else self.data[:, :, : self.num_tokens]

    def _size_for(self, needed: int) -> int:
        if self.step is None:
            return self.capacity
        size = _round_up(needed, self.step)
        return size if self.capacity is None else min(size, self.capacity)

    def _ensure(self, like: torch.Tensor, needed: int) -> torch.Tensor:
        if self.data is None or self.data.shape[2] < needed:
            b, h, _, d = like.shape
            dtype = self.dtype or like.dtype
            data = torch.empty(b, h, self._size_for(needed), d, dtype=dtype, device=like.device)
            if self.num_tokens:
                data[:, :, : self.num_tokens].copy_(self.data[:, :, : self.num_tokens])
            self.data = data
        return self.data

    def append(self, x: torch.Tensor) -> None:
        """Add ``x`` (batch, kv_heads, n, head_dim) after the held tokens."""
        n = x.shape[-2]
        needed = self.num_tokens + n
        assert self.capacity is None or needed <= self.capacity, "exact buffer overflow"
        if n:
            self._fit_dtype(x)
            self._ensure(x, needed)[:, :, self.num_tokens : needed].copy_(x)
            self.num_tokens = needed

    def assign(self, x: torch.Tensor) -> None:
        """Replace the held tokens by ``x`` (batch, kv_heads, n, head_dim)."""
        self.num_tokens = 0
        n = x.shape[-2]
        if (
            self.shrink
            and self.step is not None
            and self.data is not None
            and self.data.shape[2] > self._size_for(n)
        ):
            self.data = None  # shrink: reallocated at the new size below (or on the next append)
        self.append(x)

    def truncate(self, n: int) -> None:
        """Drop the newest ``n`` held tokens (0 <= n <= num_tokens); a stepped buffer shrinks to fit."""
        assert 0 <= n <= self.num_tokens, "exact buffer truncate beyond its tokens"
        if n == 0:
            return
        kept = self.view()[:, :, : self.num_tokens - n]
        if self.step is None:
            self.num_tokens -= n
        else:
            self.assign(kept.clone())

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def tensors(self) -> list[torch.Tensor]:
        """The storage this buffer holds (for walks independent of `nbytes`)."""
        return [] if self.data is None else [self.data]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    def clear(self) -> None:
        self.data = None
        self.num_tokens = 0

    def save_state(self, state: StateDict) -> None:
        """``dtype`` (the storage dtype asked for, or None) and ``data``: the held tokens (batch,
        kv_heads, tokens, head_dim) in their storage dtype (absent when empty)."""
        state.set("dtype", dtype_name(self.dtype))
        state.put("data", self.view())

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        """Hold exactly what `save_state` wrote (the buffer is cleared first). Raises StateError for
        more tokens than ``capacity`` or data that is not 4-dimensional."""
        self.clear()
        self.set_dtype(dtype_of(state.get("dtype"), state.name("dtype")))
        data = state.take("data", device)
        if data is None:
            return
        state.need("data", dims=4)
        if self.capacity is not None and data.shape[-2] > self.capacity:
            raise StateError(
                f"state: {state.name('data')} holds {data.shape[-2]} tokens; allowed: at most {self.capacity} "
                f"({self.name})"
            )
        self.append(data)


class ExactChunks:
    """Exact tokens (batch, kv_heads, tokens, head_dim) in frozen chunks of ``chunk_tokens`` plus a tail."""

    def __init__(self, chunk_tokens: int = 256) -> None:
        self.chunk_tokens = chunk_tokens
        self.chunks: list[torch.Tensor] = []
        self.tail = ExactBuffer(chunk_tokens, step=1)

    @property
    def num_tokens(self) -> int:
        return sum(c.shape[-2] for c in self.chunks) + self.tail.num_tokens

    def append(self, x: torch.Tensor) -> None:
        """Add ``x`` (batch, kv_heads, n, head_dim)."""
        while x.shape[-2]:
            room = self.chunk_tokens - self.tail.num_tokens
            self.tail.append(x[:, :, :room])
            x = x[:, :, room:]
            if self.tail.num_tokens == self.chunk_tokens:
                self.chunks.append(self.tail.data)
                self.tail.clear()

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        """Store new tokens in ``dtype`` (see `ExactBuffer.set_dtype`); the tail is converted, frozen
        chunks keep their dtype (each is its own segment)."""
        self.tail.set_dtype(dtype)

    def views(self) -> list[torch.Tensor]:
        """The held tokens, chunk by chunk (the tail last)."""
        tail = self.tail.view()
        return self.chunks + ([] if tail is None else [tail])

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks) + self.tail.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return self.chunks + self.tail.tensors()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.chunks = [fn(c) for c in self.chunks]
        self.tail.map_batch(fn)

    def clear(self) -> None:
        self.chunks = []
        self.tail.clear()

    def save_state(self, state: StateDict) -> None:
        """``chunks`` (their number), ``chunks.<i>`` (batch, kv_heads, chunk_tokens, head_dim) each,
        and the ``tail`` buffer."""
        state.set("chunks", len(self.chunks))
        for i, chunk in enumerate(self.chunks):
            state.put(f"chunks.{i}", chunk)
        self.tail.save_state(state.child("tail"))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        """Hold exactly what `save_state` wrote (cleared first); StateError for a missing chunk."""
        self.clear()
        self.chunks = [state.need(f"chunks.{i}", device, dims=4) for i in range(state.count("chunks"))]
        self.tail.load_state(state.child("tail"), device)
