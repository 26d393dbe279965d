"""`BlockTables`: the block ids of every row of a batch, for one layer's keys or values.

A row's table lists the ids of its blocks in token order (`block_pool.BlockPool`). The tables are
one int32 tensor (batch, capacity) whose first `num_blocks` columns are used; the capacity is the
next power of two (at least 4) of the blocks held, `table_capacity` (4 bytes per block and row,
counted in `nbytes`; a function of the block count, so byte formulas can predict it). Blocks are full and never written
again once a table holds them, so sharing needs no copy: batch operations (select, reorder,
repeat for beam search) are operations on the table rows plus reference-count updates
(copy-on-write degenerates to "never write a shared block").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .block_pool import BlockPool


def table_capacity(num_blocks: int) -> int:
    """Columns a table of ``num_blocks`` blocks allocates: the next power of two, at least 4."""
    return max(4, 1 << max(0, num_blocks - 1).bit_length())


class BlockTables:
    """Per-row block ids, int32 (batch, num_blocks) (`view`), holding one reference per entry."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # (batch, capacity) int32
        self.num_blocks = 0

    @property
    def batch_size(self) -> int:
        return 0 if self.ids is None else self.ids.shape[0]

    def view(self) -> torch.Tensor | None:
        """The used columns (batch, num_blocks), or None before the first block."""
        return None if self.ids is None else self.ids[:, : self.num_blocks]

    def append(self, ids: torch.Tensor) -> None:
        """Add ``ids`` (batch, n) after each row's blocks (the references pass to the tables)."""
        b, n = ids.shape
        needed = self.num_blocks + n
        if self.ids is None or self.ids.shape[1] < needed:
            grown = torch.empty(b, table_capacity(needed), dtype=torch.int32)
            if self.num_blocks:
                grown[:, : self.num_blocks].copy_(self.view())
            self.ids = grown
        self.ids[:, self.num_blocks : needed].copy_(ids)
        self.num_blocks = needed

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor], pool: BlockPool) -> None:
        """Apply a batch operation (``fn`` on dim 0: select, reorder, repeat) to the rows; blocks a
        row no longer holds lose a reference, repeated rows add one (shared, never copied)."""
        old = self.view()
        if old is None:
            return
        new = fn(old).to(torch.int32)
        pool.incref(new.flatten())
        pool.decref(old.flatten())
        self.ids = torch.empty(new.shape[0], table_capacity(new.shape[1]), dtype=torch.int32)
        self.ids[:, : new.shape[1]].copy_(new)

    def release(self, pool: BlockPool) -> None:
        """Drop every row (their references go back to ``pool``)."""
        held = self.view()
        if held is not None:  # tail blocks first: they are evicted before the head (prefix cache)
            pool.decref(held.flip(1).flatten())
        self.ids, self.num_blocks = None, 0

    @property
    def nbytes(self) -> int:
        return 0 if self.ids is None else self.ids.numel() * self.ids.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.ids is None else [self.ids]
