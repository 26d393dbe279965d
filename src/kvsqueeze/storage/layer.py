"""`LayerStore`: everything one attention layer keeps — exact sinks, packed history, exact window.

Token order along the sequence: ``[sinks | packed history | residual window | pending]``. The
policy decides, per update, how many incoming tokens join the sinks and how many whole blocks leave
the residual window for the packed pages.

Rollback (`crop`, for assisted/speculative decoding): while recording the past
(`record_past`, set by transformers' ``Cache.activate_past_recording``), new tokens wait exact in
``pending`` until they are accepted: `settle` (called before the next read, and after a `crop`)
passes them through the policy as an ordinary append. A rejected token therefore never reaches a
packed block, and the state after ``crop`` equals the state of a store that never saw the rejected
tokens (the packed blocks are a function of the token count: ``block_size * ceil((r - window) /
block_size)`` of the ``r`` tokens after the sinks). Without recording, ``crop`` succeeds when that
equality holds anyway (the removed tokens were all exact and no block was flushed because of them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..policies.window import SinkWindowPolicy, TokenPlan
from ..quant.exact import ExactTensor
from ..quant.paged import PagedPart
from .block_pool import BlockPool
from .exact_buffer import ExactBuffer
from .pages import Page, PagedStore, SegmentTuple
from .row_sinks import RowSinks
from .transform import PageTransform


@dataclass(frozen=True)
class DraftReads:
    """Tokens some queries of one forward read quantized although the store still holds them exact.

    ``column``: the stored column of the first of them; ``key``, ``value`` (batch, kv_heads, F,
    head_dim): the F tokens as they read back from packed blocks (dequantized, transform undone), in
    the new tokens' dtype; ``counts`` (q_len,) int64, non-decreasing: how many of the F tokens (from
    the first on) query i reads quantized.
    """

    column: int
    key: torch.Tensor
    value: torch.Tensor
    counts: torch.Tensor


class LayerStore:
    """Keys and values of one layer, shape (batch, kv_heads, tokens, head_dim) each.

    ``pools``: the (keys, values) block pools of a shared `prefix_cache.KVPool`; None: pools of
    its own."""

    def __init__(
        self,
        config: CacheConfig,
        key_transform: PageTransform | None = None,
        value_transform: PageTransform | None = None,
        name: str = "layer",
        pools: tuple[BlockPool, BlockPool] | None = None,
    ) -> None:
        self.policy = SinkWindowPolicy(config.sink_tokens, config.residual_window, config.block_size)
        self.sink_k, self.sink_v = ExactBuffer(config.sink_tokens), ExactBuffer(config.sink_tokens)
        # the window holds exactly its tokens (a reallocation of at most one window per step), so the
        # bytes held are a function of the token count alone, short sequences included
        window_capacity = max(config.residual_window, config.block_size)
        self.window_k, self.window_v = (
            ExactBuffer(window_capacity, step=1),
            ExactBuffer(window_capacity, step=1),
        )
        b, page = config.block_size, config.page_tokens
        pool_k, pool_v = pools or (None, None)  # None: the store's own pools
        self.packed_k = PagedStore(config.key, b, page, key_transform, f"{name} keys", pool_k)
        self.packed_v = PagedStore(config.value, b, page, value_transform, f"{name} values", pool_v)
        # tokens not yet accepted while recording the past (empty otherwise)
        self.pending_k, self.pending_v = ExactBuffer(None, step=16), ExactBuffer(None, step=16)
        self.record_past = False
        self.name = name
        self.exact_dtype: torch.dtype | None = None  # None: the dtype of the incoming tokens
        self.row_sinks = RowSinks(config.sink_tokens)  # each row's first real tokens, if padded
        self._planned: tuple[tuple[int, int, int], TokenPlan] | None = None  # `_plan`'s memo

    @property
    def num_tokens(self) -> int:
        return (
            self.sink_k.num_tokens
            + self.packed_k.num_tokens
            + self.window_k.num_tokens
            + self.pending_k.num_tokens
        )

    @property
    def batch_size(self) -> int:
        """Batch size of the held tokens (0 when empty)."""
        for buf in (self.sink_k, self.window_k, self.pending_k):
            if buf.data is not None:
                return buf.data.shape[0]
        return self.packed_k.tables.batch_size

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim); while recording the
        past they wait in ``pending`` until `settle`."""
        key, value = self._to_exact(key), self._to_exact(value)
        self.row_sinks.append(key, value, self.num_tokens)
        if self.record_past:
            self.pending_k.append(key)
            self.pending_v.append(value)
            return
        self._place(key, value)

    def set_exact_dtype(self, dtype: torch.dtype | None) -> None:
        """Store every token in ``dtype`` from now on (``CacheConfig.exact_dtype``: float16 for a
        float32 model); tokens are rounded to it before they are stored or quantized, so the packed
        blocks do not depend on whether a token passed through the window."""
        self.exact_dtype = dtype
        for buf in (self.sink_k, self.sink_v, self.window_k, self.window_v, self.pending_k, self.pending_v):
            buf.set_dtype(dtype)

    def _to_exact(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_dtype is None or x.dtype == self.exact_dtype:
            return x
        limit = torch.finfo(self.exact_dtype).max
        if bool((x.abs() > limit).any()) and bool(torch.isfinite(x).all()):
            warnings.warn(
                f"{self.name}: exact keys/values up to {float(x.abs().max()):.4g} exceed {self.exact_dtype} "
                f"(max {limit:.4g}); this layer keeps its exact tokens in {x.dtype} from now on",
                RuntimeWarning,
                stacklevel=5,
            )
            self.set_exact_dtype(x.dtype)
            return x
        return x.to(self.exact_dtype)

    def settle(self) -> None:
        """Accept the pending tokens: place them as an ordinary append would (a no-op when none)."""
        pending_k, pending_v = self.pending_k.view(), self.pending_v.view()
        if pending_k is None:
            return
        self.pending_k.clear()
        self.pending_v.clear()
        self._place(pending_k, pending_v)

    def draft_reads(self, key: torch.Tensor, value: torch.Tensor, chunk: int) -> DraftReads | None:
        """What plain decoding reads quantized among the tokens this store still holds exact, for a
        forward of new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim) whose first ``chunk``
        tokens are read as one chunk (a prompt: they see the store as it is) and the rest one by one
        (drafts under verification: query i sees the store after ``i`` more tokens). None when no
        block would be flushed before the last query. Call after `settle`, before `append`."""
        n, held = key.shape[-2], self.num_tokens
        base = self.packed_tokens_for(held)
        counts = [0 if i < chunk else self.packed_tokens_for(held + i) - base for i in range(n)]
        flushed = counts[-1]
        if not flushed:
            return None
        # the exact tokens from the window's first column on: the window, then the new tokens as stored
        new_k, new_v = (x if self.exact_dtype is None else x.to(self.exact_dtype) for x in (key, value))
        window_k, window_v = self.window_k.view(), self.window_v.view()
        if window_k is not None:
            new_k, new_v = torch.cat([window_k, new_k], dim=-2), torch.cat([window_v, new_v], dim=-2)
        column = self.policy.sink_tokens + base  # packing starts once the sinks are full
        skip = self.policy.sink_tokens - self.sink_k.num_tokens  # new tokens that become sinks
        region = slice(skip, skip + flushed)
        return DraftReads(
            column,
            self.packed_k.preview(new_k[:, :, region], key.dtype),
            self.packed_v.preview(new_v[:, :, region], value.dtype),
            torch.tensor(counts, dtype=torch.int64, device=key.device),
        )

    def segments(self, key: torch.Tensor, value: torch.Tensor) -> list[SegmentTuple]:
        """The held tokens for a read over the new ``key``, ``value`` (batch, kv_heads, n, head_dim),
        in sequence order ``[sinks | packed history | residual window]`` as (keys, values,
        num_tokens), read in place: sinks and blocks are only ever written past what is returned, and
        the window is cloned (at most ``residual_window`` tokens) when appending these tokens rewrites
        it. Call after `settle`, before `append` of the same tokens (which reuses this plan)."""
        out: list[SegmentTuple] = []
        if self.sink_k.num_tokens:
            out.append(
                (ExactTensor(self.sink_k.view()), ExactTensor(self.sink_v.view()), self.sink_k.num_tokens)
            )
        packed_k = self.packed_k.part()
        if packed_k is not None:
            out.append((packed_k, self.packed_v.part(), packed_k.num_tokens))
        window_k, window_v = self.window_k.view(), self.window_v.view()
        if window_k is not None:
            if self._plan(key.shape[-2]).to_quantize:  # the append rewrites the window buffer in place
                window_k, window_v = window_k.clone(), window_v.clone()
            out.append((ExactTensor(window_k), ExactTensor(window_v), window_k.shape[-2]))
        return out

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> torch.Tensor:
        """In place: undo the page transform (pre-RoPE, rotation) of the keys (``index`` 0) or values (1)
        on ``out``, ``part`` of `segments` dequantized; only the packed history is transformed."""
        if isinstance(part, PagedPart):
            (self.packed_k, self.packed_v)[index].restore_(out, 0)
        return out

    def _plan(self, n: int) -> TokenPlan:
        """The policy's plan for appending ``n`` tokens to the held ones (computed once per step)."""
        args = (self.sink_k.num_tokens, self.window_k.num_tokens, n)
        if self._planned is None or self._planned[0] != args:
            self._planned = (args, self.policy.plan(*args))
        return self._planned[1]

    def packed_tokens_for(self, num_tokens: int) -> int:
        """Tokens the packed history holds after ``num_tokens`` tokens were appended, in any chunks."""
        plan = self.policy.plan(0, 0, num_tokens)
        return plan.to_quantize

    def check_crop(self, num_remove: int) -> None:
        """Raise ValueError when removing the newest ``num_remove`` tokens cannot leave the state of a
        store that never saw them: a packed block holds one of them, or was flushed because of them
        (only a store recording the past, `record_past`, can roll back every step exactly)."""
        if not 0 <= num_remove <= self.num_tokens:
            raise ValueError(f"crop: {num_remove} tokens to remove; allowed: 0 to {self.num_tokens}")
        rest = num_remove - min(num_remove, self.pending_k.num_tokens)
        if not rest:
            return
        removable = self.window_k.num_tokens + (0 if self.packed_k.num_tokens else self.sink_k.num_tokens)
        kept = self.num_tokens - num_remove
        if rest > removable or self.packed_tokens_for(kept) != self.packed_k.num_tokens:
            raise ValueError(
                f"crop: removing {num_remove} tokens reaches tokens already quantized into packed blocks "
                f"({self.packed_k.num_tokens} packed, {self.window_k.num_tokens} in the residual window); "
                "call cache.activate_past_recording() before the forward whose tokens may be rejected "
                "(transformers' assisted decoding does)"
            )

    def crop(self, num_remove: int) -> None:
        """Remove the newest ``num_remove`` tokens, leaving the state of a store that never saw them,
        then accept the pending rest (`settle`). Raises ValueError, store unchanged, as `check_crop`."""
        self.check_crop(num_remove)
        from_pending = min(num_remove, self.pending_k.num_tokens)
        self.pending_k.truncate(from_pending)
        self.pending_v.truncate(from_pending)
        rest = num_remove - from_pending
        from_window = min(rest, self.window_k.num_tokens)
        self.window_k.truncate(from_window)
        self.window_v.truncate(from_window)
        self.sink_k.truncate(rest - from_window)
        self.sink_v.truncate(rest - from_window)
        self.settle()

    def _place(self, key: torch.Tensor, value: torch.Tensor) -> None:
        plan = self._plan(key.shape[-2])
        s = plan.to_sinks
        if s:
            self.sink_k.append(key[:, :, :s])
            self.sink_v.append(value[:, :, :s])
        for window, packed, new in (
            (self.window_k, self.packed_k, key),
            (self.window_v, self.packed_v, value),
        ):
            new = new[:, :, s:]
            if plan.to_quantize == 0:
                window.append(new)
                continue
            held = window.view()
            pending = new if held is None else torch.cat([held, new], dim=-2)
            packed.append(pending[:, :, : plan.to_quantize])
            window.assign(pending[:, :, plan.to_quantize :])

    def token_counts(self) -> dict[str, int]:
        """Tokens held, by part: ``sinks``, ``window`` (pending tokens included), and ``packed``, or
        ``exact blocks`` when the blocks hold exact values (preset ``none``)."""
        exact = self.packed_k.spec is None and self.packed_v.spec is None
        return {
            "sinks": self.sink_k.num_tokens,
            "exact blocks" if exact else "packed": self.packed_k.num_tokens,
            "window": self.window_k.num_tokens + self.pending_k.num_tokens,
        }

    def parts(self) -> dict[str, int]:
        """Bytes held, by part."""
        return {
            "sinks": self.sink_k.nbytes + self.sink_v.nbytes + self.row_sinks.nbytes,
            "packed_keys": self.packed_k.block_nbytes,
            "packed_values": self.packed_v.block_nbytes,
            "block_tables": self.packed_k.tables.nbytes + self.packed_v.tables.nbytes,
            "residual": self.window_k.nbytes
            + self.window_v.nbytes
            + self.pending_k.nbytes
            + self.pending_v.nbytes,
        }

    @property
    def nbytes(self) -> int:
        return sum(self.parts().values())

    def buffers(self) -> list:
        return [
            self.sink_k,
            self.sink_v,
            self.window_k,
            self.window_v,
            self.pending_k,
            self.pending_v,
            self.packed_k,
            self.packed_v,
            self.row_sinks,
        ]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()
