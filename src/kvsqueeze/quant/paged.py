"""`PagedPart`: tokens of every row of a batch, read through per-row block tables.

A block pool keeps blocks of ``block_size`` tokens in slabs: each slab is a `PackedTensor` (or an
`ExactTensor`) whose first dimension counts blocks instead of batch rows, shape (blocks, kv_heads,
block_size, ...). Block id ``i`` lives in slab ``i // per_slab`` at index ``i % per_slab``; every
slab but the last holds ``per_slab`` blocks. A row of the batch is its table: the ids of its
blocks, in token order.

Readers: `dequantize` (torch, block by block, the reference), the native CPU kernels
(`kernels.sources.source_meta` describes a `PagedPart` to them) and `kernels.dequantize`;
`gather` copies the blocks into one contiguous `PackedTensor` / `ExactTensor` for readers that
take no table (the Triton kernel, for now).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .exact import ExactTensor
from .packed import PackedTensor

Slab = PackedTensor | ExactTensor


@dataclass(frozen=True)
class PagedPart:
    """``num_tokens`` tokens (a whole number of blocks) of each of ``table.shape[0]`` rows.

    ``slabs``: the pool's slabs, each (blocks, kv_heads, block_size, ...) of one format;
    ``table``: int32 (batch, >= num_tokens / block_size) with contiguous rows, the block ids of each
    row in token order.
    """

    slabs: tuple[Slab, ...]
    table: torch.Tensor
    block_size: int
    per_slab: int
    num_tokens: int

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @property
    def batch_size(self) -> int:
        return self.table.shape[0]

    @property
    def spec(self):  # noqa: ANN201 - QuantSpec | None
        slab = self.slabs[0]
        return slab.spec if isinstance(slab, PackedTensor) else None

    def slice_tokens(self, start: int, stop: int) -> PagedPart:
        """The first ``stop`` tokens (``start`` must be 0, ``stop`` a whole number of blocks)."""
        assert start == 0 and stop % self.block_size == 0 and stop <= self.num_tokens, "paged slice"
        return PagedPart(self.slabs, self.table, self.block_size, self.per_slab, stop)

    def _blocks_of_slabs(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(slab, rows, cols, local ids): the table cells [rows, cols] whose block lives in that slab,
        at those indices, for every slab the first ``num_blocks`` columns use; on the slabs' device
        (the table may live on the CPU)."""
        ids = self.table[:, : self.num_blocks].long()
        slab_of = ids // self.per_slab
        device = self.slabs[0].tensors()[0].device
        out = []
        for s in slab_of.unique().tolist():
            rows, cols = (slab_of == s).nonzero(as_tuple=True)
            local = ids[rows, cols] - s * self.per_slab
            out.append((s, rows.to(device), cols.to(device), local.to(device)))
        return out

    def gather(self) -> Slab:
        """A contiguous copy in the slabs' format, (batch, kv_heads, num_tokens, ...): every held
        tensor's blocks in table order (scales (batch, kv_heads, num_tokens / group, head_dim)
        per-channel)."""
        first = self.slabs[0]
        batch, nb, where = self.batch_size, self.num_blocks, self._blocks_of_slabs()
        gathered = []
        for i, t in enumerate(first.tensors()):  # (blocks, kv_heads, rows per block, cols)
            blocks = t.new_empty(batch, t.shape[1], nb, *t.shape[2:])
            for s, rows, cols, local in where:
                blocks[rows, :, cols] = self.slabs[s].tensors()[i].index_select(0, local)
            gathered.append(blocks.flatten(2, 3))
        held = iter(gathered)
        return first.map(lambda _: next(held))  # map visits the tensors in `tensors()` order

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """Write the tokens, dequantized, into ``out`` (batch, kv_heads, num_tokens, head_dim), slab by
        slab (one gather of the blocks of the batch that live in it); returns ``out``."""
        nb = self.num_blocks
        if nb == 0:
            return out
        blocks = out.unflatten(2, (nb, self.block_size))  # (batch, kv_heads, nb, block_size, head_dim)
        for s, rows, cols, local in self._blocks_of_slabs():
            picked = self.slabs[s].map(lambda t, local=local: t.index_select(0, local))
            values = picked.dequantize(dtype=out.dtype) if isinstance(picked, PackedTensor) else picked.values
            blocks[rows, :, cols] = values.to(out.dtype)  # (k, kv_heads, block_size, head_dim)
        return out
