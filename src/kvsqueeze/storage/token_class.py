"""The tokens of one precision class of one layer (keys and values): `PackedClass`, `ExactClass`.

`PackedClass` keeps its tokens in whole blocks of a block pool (`PagedStore` per tensor kind, with
the layer's page transforms); any number of tokens may arrive, and up to ``block_size - 1`` of them
wait exact in a `Staging` buffer until a block is full, then are quantized once. It is also the
packed history of a plain store (whose tokens arrive in whole blocks, so nothing waits). With
pre-RoPE keys and tokens that are not contiguous (a token policy), the class keeps each token's
cache position beside it (int32 per token and KV head, counted in its bytes) to undo RoPE exactly.

`ExactClass` holds the exact class of a token policy: `ExactChunks` without block granularity, so
no token waits and no row is padding; exact tokens are stored untransformed.

Order inside a class does not matter to attention (keys are read post-RoPE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.exact import ExactSpec, ExactTensor
from ..quant.paged import PagedPart
from ..quant.spec import QuantSpec
from .block_pool import BlockPool
from .exact_buffer import ExactBuffer, ExactChunks
from .pages import Page, PagedStore, SegmentTuple
from .staging import Staging
from .state import StateDict
from .transform import PageTransform, PartTransform

POSITIONS_STEP = 256  # tokens by which the position buffer of a pre-RoPE class grows


class PackedClass:
    """Keys and values of one class, (batch, kv_heads, tokens, head_dim) each, in blocks of
    ``block_size`` tokens of the specs ``key``, ``value`` (`QuantSpec`, or None / `ExactSpec` for
    exact blocks). ``pools``: the (keys, values) pools of a shared `KVPool` (None: its own).
    ``positions``: the tokens arrive with their cache positions (not contiguous): kept when the keys
    are stored pre-RoPE."""

    def __init__(
        self,
        key: QuantSpec | ExactSpec | None,
        value: QuantSpec | ExactSpec | None,
        block_size: int,
        page_tokens: int,
        transforms: tuple[PageTransform | None, PageTransform | None] = (None, None),
        name: str = "class",
        pools: tuple[BlockPool, BlockPool] | None = None,
        positions: bool = False,
    ) -> None:
        pool_k, pool_v = pools or (None, None)
        self.block_size = block_size
        self.pages_k = PagedStore(key, block_size, page_tokens, transforms[0], f"{name} keys", pool_k)
        self.pages_v = PagedStore(value, block_size, page_tokens, transforms[1], f"{name} values", pool_v)
        transform = self.pages_k.transform
        keep = positions and transform is not None and transform.rope is not None
        self.staging = Staging(block_size, name, positions=keep)
        # positions of the packed tokens (batch, kv_heads, tokens, 1) int32, pre-RoPE classes only
        self.positions = ExactBuffer(None, step=POSITIONS_STEP, name=f"{name} positions") if keep else None

    @property
    def stage_k(self) -> ExactBuffer:
        return self.staging.key

    @property
    def stage_v(self) -> ExactBuffer:
        return self.staging.value

    @property
    def num_tokens(self) -> int:
        return self.pages_k.num_tokens + self.staging.num_tokens

    @property
    def batch_size(self) -> int:
        return self.pages_k.tables.batch_size

    def append(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> None:
        """Store ``key``, ``value`` (batch, kv_heads, n, head_dim), at cache ``positions`` (batch,
        kv_heads, n) int (read only by a class that keeps them); whole blocks are quantized now.
        ``padding`` (batch, n / block_size) bool: blocks of left padding (`PagedStore.append`); only
        for whole blocks arriving while nothing waits (the packed history of a plain store)."""
        if key.shape[-2] == 0:
            return
        if padding is not None:
            assert not self.staging.num_tokens and key.shape[-2] % self.block_size == 0
            self.pages_k.append(key, None, padding)
            self.pages_v.append(value, None, padding)
            return
        tokens: tuple[torch.Tensor, ...] = (key, value)
        if self.positions is not None:
            assert positions is not None, "a pre-RoPE class needs the positions of its tokens"
            tokens += (positions[..., None].to(torch.int32),)
        out = self.staging.push_blocks(tokens, self.block_size)
        if out is None:
            return
        at = None
        if self.positions is not None:
            self.positions.append(out[2])
            at = out[2][..., 0]
        self.pages_k.append(out[0], at)
        self.pages_v.append(out[1])

    def segments(self) -> list[SegmentTuple]:
        """The held tokens: the blocks (one `PagedPart` per tensor kind), then the staging buffer."""
        out: list[SegmentTuple] = []
        part_k = self.pages_k.part()
        if part_k is not None:
            out.append((part_k, self.pages_v.part(), part_k.num_tokens))
        if self.staging.num_tokens:
            out.append(
                (ExactTensor(self.stage_k.view()), ExactTensor(self.stage_v.view()), self.staging.num_tokens)
            )
        return out

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> bool:
        """When ``part`` is this class's keys (``index`` 0) or values (1) blocks: undo their page
        transform in place on ``out``, ``part`` dequantized, and return True; else False."""
        pages = (self.pages_k, self.pages_v)[index]
        slabs = pages.pool.slabs
        if not isinstance(part, PagedPart) or not slabs or part.slabs[0] is not slabs[0]:
            return False
        start = 0 if self.positions is None else self.positions.view()[:, :, : part.num_tokens, 0]
        pages.restore_(out, start)
        return True

    def read_transform(self, part: Page, index: int) -> PartTransform | None:
        """The transform a reader of ``part`` must undo when it is this class's keys (``index`` 0) or
        values (1) blocks with a page transform; else None."""
        pages = (self.pages_k, self.pages_v)[index]
        slabs = pages.pool.slabs
        if (
            pages.transform is None
            or not isinstance(part, PagedPart)
            or not slabs
            or part.slabs[0] is not slabs[0]
        ):
            return None
        start = 0 if self.positions is None else self.positions.view()[:, :, : part.num_tokens, 0]
        return PartTransform(pages.transform, start)

    def dequantize_into(self, index: int, out: torch.Tensor) -> torch.Tensor:
        """The packed tokens of keys (``index`` 0) or values (1), dequantized with the transform undone,
        into ``out`` (batch, kv_heads, packed tokens, head_dim)."""
        positions = None if self.positions is None else self.positions.view()[..., 0]
        return (self.pages_k, self.pages_v)[index].dequantize_into(out, positions if index == 0 else None)

    def parts(self, name: str) -> dict[str, int]:
        """Bytes held, by part, prefixed with the class ``name``: blocks with their tables (keys,
        values), and the staging buffer with the positions of a pre-RoPE class."""
        staging = self.staging.nbytes + (0 if self.positions is None else self.positions.nbytes)
        return {
            f"{name}_keys": self.pages_k.nbytes,
            f"{name}_values": self.pages_v.nbytes,
            f"{name}_staging": staging,
        }

    def constants(self) -> list[torch.Tensor]:
        """The page transforms' constants (rotation, RoPE frequencies), counted once per cache."""
        return self.pages_k.constants() + self.pages_v.constants()

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        self.staging.set_dtype(dtype)

    def buffers(self) -> list:
        extra = [] if self.positions is None else [self.positions]
        return [self.pages_k, self.pages_v, *self.staging.buffers(), *extra]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()

    def save_state(self, state: StateDict) -> None:
        """``keys`` and ``values`` (`PagedStore.save_state`), the ``staging`` buffer and, for a
        pre-RoPE class, the packed tokens' ``positions``."""
        self.pages_k.save_state(state.child("keys"))
        self.pages_v.save_state(state.child("values"))
        self.staging.save_state(state.child("staging"))
        if self.positions is not None:
            self.positions.save_state(state.child("positions"))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        self.pages_k.load_state(state.child("keys"), device)
        self.pages_v.load_state(state.child("values"), device)
        self.staging.load_state(state.child("staging"), device)
        if self.positions is not None:
            self.positions.load_state(state.child("positions"), device)


class ExactClass:
    """Exact keys and values of one class, (batch, kv_heads, tokens, head_dim) each, without padding."""

    def __init__(self) -> None:
        self.pages_k, self.pages_v = ExactChunks(), ExactChunks()

    @property
    def num_tokens(self) -> int:
        return self.pages_k.num_tokens

    @property
    def batch_size(self) -> int:
        views = self.pages_k.views()
        return views[0].shape[0] if views else 0

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Store ``key``, ``value`` (batch, kv_heads, n, head_dim) as they are (``positions`` unused)."""
        self.pages_k.append(key)
        self.pages_v.append(value)

    def segments(self) -> list[SegmentTuple]:
        """The held tokens, chunk by chunk."""
        return [
            (ExactTensor(k), ExactTensor(v), k.shape[-2])
            for k, v in zip(self.pages_k.views(), self.pages_v.views(), strict=True)
        ]

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> bool:
        return False  # exact tokens are stored untransformed

    def read_transform(self, part: Page, index: int) -> PartTransform | None:
        return None

    def parts(self, name: str) -> dict[str, int]:
        return {f"{name}_keys": self.pages_k.nbytes, f"{name}_values": self.pages_v.nbytes}

    def constants(self) -> list[torch.Tensor]:
        return []

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        """New tokens in ``dtype``; the tail is converted, frozen chunks keep theirs (`ExactChunks`)."""
        self.pages_k.set_dtype(dtype)
        self.pages_v.set_dtype(dtype)

    def buffers(self) -> list:
        return [self.pages_k, self.pages_v]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()

    def save_state(self, state: StateDict) -> None:
        """``keys`` and ``values`` (`ExactChunks.save_state`)."""
        self.pages_k.save_state(state.child("keys"))
        self.pages_v.save_state(state.child("values"))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        self.pages_k.load_state(state.child("keys"), device)
        self.pages_v.load_state(state.child("values"), device)


def token_class(
    key: QuantSpec | None,
    value: QuantSpec | None,
    block_size: int,
    page_tokens: int,
    transforms: tuple[PageTransform | None, PageTransform | None],
    name: str,
) -> PackedClass | ExactClass:
    """The class store of a token policy for specs ``key``, ``value`` (None: exact): `ExactClass`
    when both are exact, else a `PackedClass` keeping the positions of pre-RoPE keys."""
    if key is None and value is None:
        return ExactClass()
    return PackedClass(key, value, block_size, page_tokens, transforms, name, positions=True)
