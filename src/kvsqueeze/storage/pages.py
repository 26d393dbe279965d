"""`PagedStore`: one layer's packed keys (or values) of a batch, in blocks of a `BlockPool`.

Each row of the batch holds its own blocks (`BlockTables`); the pool's blocks have no batch
dimension. Tokens are appended in whole blocks, quantized once and never touched again; appending
costs O(new tokens) and never copies what is already stored. An optional `PageTransform`
(pre-RoPE, rotation) is applied to packed (not exact) blocks before quantization; the readers undo
it with `restore_`. Pre-RoPE keys need each token's position: contiguous from the store's first
token (the packed history of a plain store, ``start``), or given per token (``positions``: the
classes of a token policy, whose tokens are not contiguous).

The pool is the store's own (default: it holds exactly the blocks of this store's rows, freed ones
included until reused) or shared with other stores (``pool=``; `nbytes` then counts the distinct
blocks this store references). Metadata overflow (`quant.overflow`) and exact dtypes widen the
pool, see `block_pool`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.dequantize import dequantize_into
from ..quant.exact import ExactSpec, ExactTensor, storage_spec
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from ..quant.spec import QuantSpec
from .block_pool import BlockPool
from .block_table import BlockTables
from .state import StateDict, StateError, put_blocks, spec_from_state, spec_state, take_blocks
from .transform import PageTransform

Page = PackedTensor | ExactTensor | PagedPart
SegmentTuple = tuple[Page, Page, int]
"""(keys, values, num_tokens): keys and values (batch, kv_heads, >= num_tokens, head_dim)."""


class PagedStore:
    """Packed history of one tensor kind of one layer, shape (batch, kv_heads, num_tokens, head_dim).

    ``spec``: the blocks' format, a `QuantSpec` or an `ExactSpec` (None: ``ExactSpec()``). ``name`` (e.g. ``"layer 3 keys"``) labels the pool's metadata-overflow warning; ``page_tokens``
    sets the pool's slab size (``page_tokens / block_size`` blocks per slab).
    """

    def __init__(
        self,
        spec: QuantSpec | ExactSpec | None,
        block_size: int,
        page_tokens: int,
        transform: PageTransform | None = None,
        name: str = "packed store",
        pool: BlockPool | None = None,
    ) -> None:
        self.owns_pool = pool is None
        spec = storage_spec(spec)
        self.pool = pool or BlockPool(spec, block_size, max(1, page_tokens // block_size), name=name)
        self.block_size = block_size
        self.name = name
        exact = spec.is_exact  # exact blocks are stored untransformed
        self.transform = None if transform is None or transform.is_identity or exact else transform
        self.tables = BlockTables()

    @property
    def spec(self) -> QuantSpec | ExactSpec:
        return self.pool.spec

    @property
    def is_exact(self) -> bool:
        """Whether the blocks hold exact values (an `ExactSpec`)."""
        return self.pool.spec.is_exact

    @property
    def num_tokens(self) -> int:
        return self.tables.num_blocks * self.block_size

    def append(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, padding: torch.Tensor | None = None
    ) -> None:
        """Quantize and store ``x`` (batch, kv_heads, n, head_dim), n a whole number of blocks, at
        ``positions`` (batch, kv_heads, n) int (None: contiguous after the stored tokens).
        ``padding`` (batch, n / block_size) bool marks blocks that hold no token of their row (left
        padding, which the attention mask hides): they are not stored; their table entries point at
        a block stored by this call (any finite content will do), or the pool's null block when
        every block here is padding."""
        if self.transform is not None:
            x = self.transform.encode(x, self.num_tokens if positions is None else positions)
        blocks = self.pool.encode(x)
        b, nb = x.shape[0], x.shape[-2] // self.block_size
        if padding is None or not bool(padding.any()):
            ids = self.pool.allocate(b * nb, like=x)
            self.pool.write(ids, blocks)
        else:
            padding = padding.cpu()  # block ids live on the CPU; the row starts on the model's device
            keep = (~padding).flatten().nonzero(as_tuple=True)[0]
            ids = torch.empty(b * nb, dtype=torch.int64)
            if len(keep):
                ids[keep] = self.pool.allocate(len(keep), like=x)
                self.pool.write(ids[keep], blocks.map(lambda t: t[keep.to(t.device)]))
            fill = int(ids[keep[0]]) if len(keep) else self.pool.null_block(like=x)
            ids[padding.flatten()] = fill
            self.pool.incref([fill] * (b * nb - len(keep)))  # the tables hold one reference per entry
        self.tables.append(ids.view(b, nb))

    def append_blocks(self, ids: torch.Tensor) -> None:
        """Add held blocks ``ids`` (batch, n) of the pool (e.g. a prefix-cache hit) after each row's
        blocks; takes one more reference to each."""
        self.pool.incref(ids.flatten())
        self.tables.append(ids)

    def preview(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` (batch, kv_heads, n, head_dim), n whole blocks, as it reads back once appended here
        (quantized, dequantized, transform undone), in ``dtype``; nothing is stored. What the assisted
        decoding's verification reads for tokens plain decoding would already have quantized."""
        if self.transform is not None:
            x = self.transform.encode(x, self.num_tokens)
        encoded = ExactTensor(x) if self.is_exact else PackedTensor.from_float(x, self.spec)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        dequantize_into(encoded, out)
        return self.restore_(out, self.num_tokens)

    def part(self) -> PagedPart | None:
        """The stored tokens of every row, read in place through the block tables (None when empty)."""
        table = self.tables.view()
        return None if table is None or not self.num_tokens else self.pool.part(table, self.num_tokens)

    def filled(self) -> list[Page]:
        """The stored tokens as parts a reader iterates over (one `PagedPart`, or none)."""
        part = self.part()
        return [] if part is None else [part]

    def dequantize_into(self, out: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Write all stored tokens, dequantized, into ``out`` (batch, kv_heads, num_tokens, head_dim);
        ``positions`` as given to `append` (None: contiguous)."""
        part = self.part()
        if part is not None:
            dequantize_into(part, out)
        return self.restore_(out, 0 if positions is None else positions)

    def restore_(self, out: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """In place: undo the transform on dequantized stored tokens held in ``out`` (batch, kv_heads,
        n, head_dim): tokens ``start ..`` of this store, or at ``start`` (batch, kv_heads, n) int
        positions; a no-op without a transform."""
        return out if self.transform is None else self.transform.decode_(out, start)

    @property
    def block_nbytes(self) -> int:
        """Bytes of the blocks: the own pool's (freed ones included until reused), or in a shared
        pool the distinct blocks this store references."""
        if self.owns_pool:
            return self.pool.nbytes
        table = self.tables.view()
        if table is None:
            return 0
        distinct = (
            table.numel() if table.shape[0] == 1 else int(table.unique().numel())
        )  # one row: no repeats
        return distinct * self.pool.block_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held: `block_nbytes` plus the block tables."""
        return self.block_nbytes + self.tables.nbytes

    def tensors(self) -> list[torch.Tensor]:
        """The storage held (own pool's slabs, the tables and the transform's constants, which a
        cache counts once: `constants`), for walks independent of `nbytes`."""
        own = self.pool.tensors() if self.owns_pool else []
        return own + self.tables.tensors() + self.constants()

    def constants(self) -> list[torch.Tensor]:
        """Tensors the transform holds (rotation, RoPE frequencies), possibly shared with other stores."""
        return [] if self.transform is None else self.transform.tensors()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (select, reorder, repeat) to the block tables."""
        self.tables.map_batch(fn, self.pool)

    def clear(self) -> None:
        self.tables.release(self.pool)
        if self.owns_pool:
            self.pool.clear()

    def save_state(self, state: StateDict) -> None:
        """``spec`` (the pool's format now, widened metadata included), the distinct blocks the rows
        hold (``blocks.*``, `state.put_blocks`, in order of block id) and ``table`` (batch, blocks)
        int32: each row's blocks as indices into them (absent when empty)."""
        state.set("spec", spec_state(self.spec))
        table = self.tables.view()
        if table is None or not self.num_tokens:
            return
        ids, local = table.long().unique(return_inverse=True)
        put_blocks(state.child("blocks"), self.pool.read(ids), self.spec)
        state.put("table", local.to(torch.int32))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        """Hold the blocks `save_state` wrote, copied into newly allocated blocks of the pool (the
        store is cleared first). StateError for blocks of another format than the store's spec, or a
        table pointing outside the saved blocks."""
        self.clear()
        table = state.take("table")
        if table is None:
            return
        spec = spec_from_state(state.value("spec"), state.name("spec"))
        if spec.is_exact != self.spec.is_exact:
            raise StateError(
                f"state: {state.name('spec')} is {'exact' if spec.is_exact else 'packed'} blocks; this store "
                f"keeps {'exact' if self.spec.is_exact else 'packed'} ones"
            )
        blocks = take_blocks(state.child("blocks"), spec, self.block_size, device)
        num_blocks = blocks.tensors()[0].shape[0]
        if table.dim() != 2 or table.numel() and not 0 <= int(table.min()) <= int(table.max()) < num_blocks:
            raise StateError(
                f"state: {state.name('table')} {tuple(table.shape)} points outside the {num_blocks} saved blocks"
            )
        try:
            ids = self.pool.add_blocks(blocks)
        except ValueError as err:
            raise StateError(f"state: {state.name('blocks')}: {err}") from None
        rows = ids[table.long()]
        self.pool.incref(rows.flatten())  # the tables hold one reference per entry,
        self.pool.decref(ids)  # the allocation's own goes
        self.tables.append(rows.to(torch.int32))
