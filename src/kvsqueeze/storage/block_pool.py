"""`BlockPool`: blocks of ``block_size`` tokens of one storage format, for one layer and tensor kind.

Storage is a list of slabs (`quant.paged`): each slab is a `PackedTensor` (or, for an
`ExactSpec`, an `ExactTensor`) of shape (blocks, kv_heads, block_size, ...); block id ``i`` is block
``i % per_slab`` of slab ``i // per_slab``. A block has no batch dimension: sequences address
blocks through their block tables (`block_table.BlockTables`), and several sequences may hold the
same block (reference counts).

Allocation: a free block is reused first, least recently freed first (`free` order is the
eviction order of the prefix cache: a freed block keeps its content, and its hash, until it is
handed out again; `on_reuse` then tells the prefix cache to forget it). Without a free block the
last slab grows by exactly the blocks asked for (a copy of at most one slab), or a new slab
starts; so a pool holds the bytes of the blocks it ever needed at once, never a page of unused
tail. ``max_blocks`` bounds the pool: `allocate` then raises `PoolFull`.

Bytes: `block_nbytes` is computed from the spec (codes + scales + zero points + outlier side
store, or the exact dtype's elements); `nbytes` is ``blocks allocated x block_nbytes`` and equals the bytes of the slab tensors.

Metadata range (`quant.overflow`): a block whose scales, zero points or outlier values do not fit
the spec's ``scale_dtype`` switches the whole pool to float32 metadata (`widen`), converting the
held blocks once and exactly, with a `MetadataOverflowWarning`. Exact pools widen their spec's dtype
the same way when a block arrives in a wider float dtype (float16 pool, float32 tokens).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch

from ..quant.exact import ExactSpec, ExactTensor, storage_spec
from ..quant.overflow import WIDE_SCALE_DTYPE, MetadataOverflowWarning, metadata_amax
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart, Slab
from ..quant.spec import QuantSpec


class PoolFull(RuntimeError):
    """The pool has no free block and may not grow (``max_blocks``)."""


class BlockPool:
    """Blocks of one format (``spec``: a `QuantSpec` or an `ExactSpec`; None means ``ExactSpec()``) of
    one layer's keys or values.

    Shapes are fixed by the first write: ``kv_heads``, ``head_dim``, device (and for an exact spec
    without a dtype, the dtype, widened later when wider tokens arrive).
    """

    def __init__(
        self,
        spec: QuantSpec | ExactSpec | None,
        block_size: int,
        per_slab: int,
        max_blocks: int | None = None,
        name: str = "block pool",
    ) -> None:
        if block_size < 1 or per_slab < 1:
            raise ValueError(f"block pool: block_size {block_size}, per_slab {per_slab}; allowed: >= 1")
        self.spec: QuantSpec | ExactSpec = storage_spec(spec)
        self._given_spec = self.spec
        self.block_size = block_size
        self.per_slab = per_slab
        self.max_blocks = max_blocks
        self.name = name
        self.slabs: list[Slab] = []
        self.refs: list[int] = []  # per block id
        self.free: OrderedDict[int, None] = OrderedDict()  # free ids, least recently freed first
        self.on_reuse: Callable[[int], None] | None = None  # called when a freed block is handed out
        self._shape: tuple[int, int, torch.device] | None = None
        self._block_nbytes: tuple[QuantSpec | ExactSpec, tuple, int] | None = None  # `block_nbytes`' memo
        self._null: int | None = None  # `null_block`'s id, once asked for

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks allocated (in use or free)."""
        return len(self.refs)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block, from the spec (0 before the first write fixes the shape)."""
        if self._shape is None:
            return 0
        memo = self._block_nbytes
        if memo is not None and memo[0] is self.spec and memo[1] is self._shape:
            return memo[2]  # read for every layer of every sequence at every step (KV budget, metrics)
        heads, head_dim, _ = self._shape
        nbytes = round(self.block_size * self.spec.bytes_per_token(heads, head_dim))
        self._block_nbytes = (self.spec, self._shape, nbytes)
        return nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held by the slabs: ``num_blocks * block_nbytes``."""
        return self.num_blocks * self.block_nbytes

    def tensors(self) -> list[torch.Tensor]:
        """The storage of every slab (for walks independent of `nbytes`)."""
        return [t for slab in self.slabs for t in slab.tensors()]

    # --- allocation --------------------------------------------------------------------------------
    def _empty(self, blocks: int) -> Slab:
        heads, head_dim, device = self._shape
        if self.spec.is_exact:
            return ExactTensor.empty(blocks, heads, self.block_size, head_dim, self.spec.dtype, device)
        return PackedTensor.empty(blocks, heads, self.block_size, head_dim, self.spec, device)

    def _grow(self, n: int) -> None:
        """Add ``n`` blocks at the end: fill the last slab (grown by reallocation), then new slabs."""
        if self.max_blocks is not None and self.num_blocks + n > self.max_blocks:
            raise PoolFull(
                f"{self.name}: {n} more blocks needed, {self.num_free} free of {self.num_blocks} "
                f"(max_blocks {self.max_blocks})"
            )
        while n:
            held = self.num_blocks - (len(self.slabs) - 1) * self.per_slab if self.slabs else self.per_slab
            if held == self.per_slab:  # last slab full (or none): a new one, sized for what is asked
                take = min(n, self.per_slab)
                self.slabs.append(self._empty(take))
            else:
                take = min(n, self.per_slab - held)
                grown = self._empty(held + take)
                grown.map(lambda t, held=held: t[:held]).copy_(self.slabs[-1])
                self.slabs[-1] = grown
            self.refs += [0] * take
            self.free.update((i, None) for i in range(self.num_blocks - take, self.num_blocks))
            n -= take

    def allocate(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` block ids (int64), each with one reference. ``like`` (batch, kv_heads, tokens,
        head_dim) fixes the shape on first use. Raises PoolFull (``max_blocks``)."""
        if self._shape is None:
            assert like is not None, "the first allocation needs a tensor to take the shape from"
            self._shape = (like.shape[1], like.shape[-1], like.device)
            if self.spec.is_exact and self.spec.dtype is None:
                self.spec = ExactSpec(like.dtype)
        if n > self.num_free:
            self._grow(n - self.num_free)
        ids = []
        for _ in range(n):
            i, _ = self.free.popitem(last=False)
            if self.on_reuse is not None:
                self.on_reuse(i)
            self.refs[i] = 1
            ids.append(i)
        return torch.tensor(ids, dtype=torch.int64)

    def null_block(self, like: torch.Tensor) -> int:
        """The id of the pool's null block: a block of zeros (every format dequantizes it to 0.0)
        that block tables point at for a block holding no token of its row (the left padding of a
        padded batch, which the attention mask hides), so such blocks cost no storage. Allocated on
        first use and never freed (the pool keeps one reference); counted in `nbytes` like any block.
        ``like`` as in `allocate`."""
        if self._null is None:
            ids = self.allocate(1, like=like)
            self.write(ids, self._empty(1).map(torch.zero_))
            self._null = int(ids[0])
        return self._null

    def incref(self, ids: torch.Tensor | list[int]) -> None:
        """One more reference to each of ``ids`` (repeats count); a free block is taken back."""
        for i in _ints(ids):
            if self.refs[i] == 0:
                del self.free[i]
            self.refs[i] += 1

    def decref(self, ids: torch.Tensor | list[int]) -> None:
        """One reference less to each of ``ids``; a block without references becomes free (its
        content stays until it is handed out again)."""
        for i in _ints(ids):
            assert self.refs[i] > 0, f"{self.name}: block {i} freed twice"
            self.refs[i] -= 1
            if self.refs[i] == 0:
                self.free[i] = None

    def clear(self) -> None:
        """Drop every block and slab (all references are gone)."""
        self.slabs, self.refs, self.free = [], [], OrderedDict()
        self._shape = self._null = None
        if self.spec.is_exact:  # the dtype is fixed again by the next first write, as at creation
            self.spec = self._given_spec

    # --- content -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Slab:
        """``x`` (batch, kv_heads, n, head_dim), n whole blocks, in this pool's format as (batch * n /
        block_size, kv_heads, block_size, ...) blocks, row by row; widens the pool when needed."""
        if self.spec.is_exact:
            held = self.spec.dtype
            if held is not None and held != torch.promote_types(held, x.dtype):
                self._widen_exact(torch.promote_types(held, x.dtype))
            if self.spec.dtype is not None:
                x = x.to(self.spec.dtype)
            encoded: Slab = ExactTensor(x)
        else:
            encoded = PackedTensor.from_float(x, self.spec)
            if encoded.spec is not self.spec:
                self._widen(encoded)
        nb = x.shape[-2] // self.block_size
        return encoded.map(lambda t: t.unflatten(2, (nb, -1)).transpose(1, 2).flatten(0, 1))

    def write(self, ids: torch.Tensor, blocks: Slab) -> None:
        """Store ``blocks`` (len(ids), kv_heads, block_size, ...) at block ``ids`` (int64)."""
        slab_of = ids // self.per_slab
        for s in slab_of.unique().tolist():
            sel = (slab_of == s).nonzero(as_tuple=True)[0]
            local = ids[sel] - s * self.per_slab
            # consecutive ids taken from consecutive rows (fresh blocks): slice copies, no index kernels
            runs = len(sel) == 1 or bool(((local.diff() == 1) & (sel.diff() == 1)).all())
            first, row, n = int(local[0]), int(sel[0]), len(sel)
            for dst, src in zip(self.slabs[s].tensors(), blocks.tensors(), strict=True):
                if runs:
                    dst[first : first + n].copy_(src[row : row + n])
                else:
                    dst.index_copy_(0, local.to(dst.device), src.index_select(0, sel.to(src.device)))

    def read(self, ids: torch.Tensor) -> Slab:
        """Copies of blocks ``ids`` (int64 (n,)) as one slab (n, kv_heads, block_size, ...), in the
        order of ``ids``: the inverse of `write` (what a file saves)."""
        first = self.slabs[0]
        out = [t.new_empty((len(ids), *t.shape[1:])) for t in first.tensors()]
        slab_of = ids // self.per_slab
        for s in slab_of.unique().tolist():
            sel = (slab_of == s).nonzero(as_tuple=True)[0]
            local = ids[sel] - s * self.per_slab
            for dst, src in zip(out, self.slabs[s].tensors(), strict=True):
                dst[sel.to(dst.device)] = src.index_select(0, local.to(src.device))
        held = iter(out)
        return first.map(lambda _: next(held))  # map visits the tensors in `tensors()` order

    def add_blocks(self, blocks: Slab) -> torch.Tensor:
        """Store ``blocks`` (n, kv_heads, block_size, ...), e.g. read from a file, in ``n`` blocks
        allocated here; returns their ids (int64, one reference each). Packed blocks must have this
        pool's spec up to the metadata dtype: wider metadata widens the pool (as `encode` does), narrower
        metadata is widened exactly. Exact blocks are stored in the pool's dtype, widened like `encode`.
        Raises ValueError for blocks of another format, PoolFull (``max_blocks``)."""
        if self.spec.is_exact:
            values = blocks.values
            held = self.spec.dtype
            if held is not None and held != torch.promote_types(held, values.dtype):
                self._widen_exact(torch.promote_types(held, values.dtype))
            if self.spec.dtype is not None:
                values = values.to(self.spec.dtype)
            blocks = ExactTensor(values)
            like = values[:1, :, :0]
        else:
            spec = getattr(blocks, "spec", None)
            if (
                not isinstance(spec, QuantSpec)
                or replace(spec, scale_dtype=self.spec.scale_dtype) != self.spec
            ):
                raise ValueError(
                    f"{self.name}: blocks of format {spec}; allowed: this pool's format {self.spec}"
                )
            if spec.scale_dtype != self.spec.scale_dtype:
                if spec.scale_dtype == WIDE_SCALE_DTYPE:
                    self._widen(blocks)
                else:
                    blocks = blocks.with_metadata_of(self.spec)
            like = torch.empty(1, blocks.codes.shape[1], 0, blocks.head_dim, device=blocks.codes.device)
        n = blocks.tensors()[0].shape[0]
        ids = self.allocate(n, like=like)
        self.write(ids, blocks)
        return ids

    def part(self, table: torch.Tensor, num_tokens: int) -> PagedPart:
        """The tokens of block table ``table`` (int32 (batch, >= num_tokens / block_size)) as a
        `PagedPart` over this pool's slabs (read in place)."""
        return PagedPart(tuple(self.slabs), table, self.block_size, self.per_slab, num_tokens)

    def _widen(self, encoded: PackedTensor) -> None:
        """Switch to the (float32) metadata of ``encoded``, whose own metadata overflowed this spec."""
        assert not self.spec.is_exact
        old, new = self.spec, encoded.spec
        warnings.warn(
            f"{self.name}: K/V metadata (scales, zero points, outlier values) of magnitude up to "
            f"{metadata_amax(encoded.scale, encoded.zero, encoded.outlier_value):.6g} overflow scale_dtype "
            f"{old.scale_dtype} (largest finite {torch.finfo(old.torch_scale_dtype).max:.6g}); this store "
            f"keeps {new.scale_dtype} metadata from now on ({old.bits_per_element:g} -> "
            f"{new.bits_per_element:g} bits per element)",
            MetadataOverflowWarning,
            stacklevel=5,
        )
        self.spec = new
        self.slabs = [slab.with_metadata_of(new) for slab in self.slabs]

    def _widen_exact(self, dtype: torch.dtype) -> None:
        self.spec = ExactSpec(dtype)
        self.slabs = [ExactTensor(slab.values.to(dtype)) for slab in self.slabs]


def _ints(ids: torch.Tensor | list[int]) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
