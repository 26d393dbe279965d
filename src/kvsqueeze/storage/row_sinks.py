"""`RowSinks`: where each row of a left-padded batch starts, and its first real tokens kept exact.

A layer store lays a batch out in shared columns (column ``c`` of every row is its ``c``-th stored
token), so its exact sinks are the first ``sink_tokens`` columns: padding, for the short rows of a
left-padded batch, whose real first tokens would then be quantized. `RowSinks` keeps an exact copy
of the ``sink_tokens`` tokens from each row's first real token on (where its position id is 0, as
``generate`` numbers left-padded rows) and reads put them back over those columns: the reference
path writes them into the dequantized keys and values (`overlay`), the fused path reads them as one
more exact segment while the mask hides the quantized copies (`attention_inputs` in
`attention.parts`). The starts (int64 per row) also tell the store which blocks hold only padding
(not stored: `LayerStore._padding_blocks`). Nothing is held while no row is padded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .state import StateDict


@dataclass(frozen=True)
class RowSinkView:
    """The row sinks as one read sees them: ``columns`` and ``valid`` (batch, sink_tokens) — the
    column of each copy and whether it is a stored token (invalid copies point at the first new
    token) — and the exact ``key``, ``value`` copies (batch, kv_heads, sink_tokens, head_dim)."""

    columns: torch.Tensor
    valid: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def overlay(self, out: torch.Tensor, index: int) -> None:
        """Write the exact keys (``index`` 0) or values (1) over their columns of ``out`` (batch,
        kv_heads, tokens, head_dim), in place."""
        exact = (self.key, self.value)[index]
        rows, slots = self.valid.nonzero(as_tuple=True)
        out[rows, :, self.columns[rows, slots]] = exact[rows, :, slots].to(out.dtype)


def first_real_columns(
    position_ids: torch.Tensor | None, batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(has_start, column), each (batch,): whether a row's first real token is among these tokens and
    its column, from ``position_ids`` (batch, n). The first real token is the last position 0 of a row:
    ``generate`` numbers left padding 0 (transformers 5.24) or 1 (older releases). None when the ids
    say nothing per row (absent, or one row broadcast to a batch of ``batch`` > 1 rows; one row of a
    batch of one — ``batch`` 1 — is that row's own)."""
    if position_ids is None or position_ids.dim() != 2:
        return None
    if position_ids.shape[0] < 2 and batch != 1:
        return None
    zero = position_ids == 0
    n = position_ids.shape[-1]
    last = n - 1 - zero.flip(-1).int().argmax(-1)
    return zero.any(-1), last


class RowSinks:
    """Each row's first real column ``starts`` (batch,) int64 and exact (batch, kv_heads, sink_tokens,
    head_dim) copies of its first real tokens."""

    def __init__(self, sink_tokens: int) -> None:
        self.sink_tokens = sink_tokens
        self.starts: torch.Tensor | None = None  # (batch,) column of each row's first real token
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether some row starts after column 0 (a left-padded batch)."""
        return self.starts is not None

    def observe(self, position_ids: torch.Tensor | None, seen: int, batch: int | None = None) -> None:
        """Note where rows start from the ``position_ids`` (batch, n) of tokens stored from column
        ``seen`` on (`first_real_columns`); rows without a position 0 there keep theirs. Kept without
        sinks too: the store does not keep blocks of padding (`LayerStore._padding_blocks`)."""
        found = first_real_columns(position_ids, batch)
        if found is None:
            return
        has_start, first = found
        known = self.starts if self.starts is not None else torch.zeros_like(first)
        starts = torch.where(has_start, seen + first, known.to(first.device))
        self.starts = starts if bool((starts > 0).any()) else None
        if self.starts is None:
            self.key = self.value = None

    def set_starts(self, starts: torch.Tensor, held: int = 0) -> None:
        """Take each row's first real column ``starts`` (batch,) int64 as given (from the attention
        mask: exact, where `observe` infers it from position ids), as a copy of this store's own.
        Raises ValueError when they disagree with the starts of the ``held`` columns already stored
        (another batch of the same size, fed without ``cache.reset()``)."""
        if held:
            known = self.starts if self.starts is not None else torch.zeros_like(starts)
            if not torch.equal(known.to(starts.device).clamp(max=held), starts.clamp(max=held)):
                raise ValueError(
                    f"attention_mask: rows start at columns {starts.clamp(max=held).tolist()} of the {held} "
                    f"held ones, where this cache's rows start at {known.clamp(max=held).tolist()}: it holds "
                    "another batch; call cache.reset() (or pass a new cache) before a new batch"
                )
        self.starts = starts.clone() if bool((starts > 0).any()) else None
        if self.starts is None:
            self.key = self.value = None

    def view(self, held: int) -> RowSinkView | None:
        """The copies for a read over ``held`` stored tokens plus new ones; None when no row is padded."""
        if not self.active or self.key is None:
            return None
        cols = self.starts[:, None] + torch.arange(self.sink_tokens, device=self.starts.device)
        valid = cols < held
        return RowSinkView(torch.where(valid, cols, torch.full_like(cols, held)), valid, self.key, self.value)

    def append(self, key: torch.Tensor, value: torch.Tensor, seen: int) -> None:
        """Copy the row sinks among new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim) stored
        from column ``seen`` on."""
        if not self.active:
            return
        n = key.shape[-2]
        rel = self.starts[:, None] + torch.arange(self.sink_tokens, device=key.device) - seen
        inside = (rel >= 0) & (rel < n)
        if not bool(inside.any()):
            return
        b, h, _, d = key.shape
        index = rel.clamp(0, n - 1)[:, None, :, None].expand(b, h, self.sink_tokens, d)
        mask = inside[:, None, :, None]
        if self.key is None:
            self.key = key.new_zeros(b, h, self.sink_tokens, d)
            self.value = value.new_zeros(b, h, self.sink_tokens, d)
        self.key = torch.where(mask, key.gather(2, index), self.key)
        self.value = torch.where(mask, value.gather(2, index), self.value)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.starts, self.key, self.value) if t is not None]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.starts is not None:
            self.starts = fn(self.starts)
        if self.key is not None:
            self.key, self.value = fn(self.key), fn(self.value)

    def clear(self) -> None:
        self.starts = self.key = self.value = None

    def save_state(self, state: StateDict) -> None:
        """``starts`` (batch,), ``keys`` and ``values`` (batch, kv_heads, sink_tokens, head_dim); absent
        while no row is padded."""
        state.put("starts", self.starts)
        state.put("keys", self.key)
        state.put("values", self.value)

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        self.starts = state.take("starts", device)
        self.key, self.value = state.take("keys", device), state.take("values", device)
