"""`LayerStore`: everything one attention layer keeps — exact sinks, placed tokens, exact window.

Parts: ``[sinks | placed tokens | residual window | pending]``. `SinkWindowPolicy` decides, per
update, how many incoming tokens join the sinks and how many whole blocks leave the residual window
(a `Staging`); the placement strategy decides where those go:

* `placement.SequencePlacement` (no token policy): one packed history in sequence order, on block
  pools (shareable through a `KVPool`);
* `policy_placement.PolicyPlacement` (``CacheConfig.tokens``): precision classes (exact, high, low)
  or eviction, by roles and importance; tokens of a step wait in ``pending`` until the attention has
  read them (`commit`: an attention scorer observes the queries first).

Both packed kinds take the layer's page transforms (rotation, pre-RoPE keys); exact parts are
stored untransformed, in the store's exact dtype (`set_exact_dtype`). Readers use one interface:
`segments` (held tokens, read in place) and `restore_` (undo a transform on a dequantized part).
``num_seen`` counts every token stored (positions), ``num_tokens`` those held (fewer after eviction).

Rollback (`crop`, for assisted/speculative decoding; the plain strategy only): while recording the past
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

from ..config import CacheConfig, exact_storage_dtype
from ..policies.classes import Precision
from ..policies.plan import Counts
from ..policies.window import SinkWindowPolicy, TokenPlan
from ..quant.exact import ExactTensor
from .block_pool import BlockPool
from .exact_buffer import ExactBuffer, ExactChunks
from .pages import Page, PagedStore, SegmentTuple
from .placement import SequencePlacement
from .policy_placement import PolicyPlacement
from .row_sinks import RowSinks, RowSinkView
from .staging import Staging
from .state import StateDict, StateError, dtype_name, dtype_of
from .token_class import ExactClass, PackedClass
from .transform import PageTransform, PartTransform


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

    ``config``: the layer's config (``config.tokens`` selects the token-policy placement);
    ``key_transform``, ``value_transform``: the page transforms of packed tokens; ``pools``: the
    (keys, values) block pools of a shared `prefix_cache.KVPool` (plain strategy; None: pools of
    its own)."""

    def __init__(
        self,
        config: CacheConfig,
        key_transform: PageTransform | None = None,
        value_transform: PageTransform | None = None,
        name: str = "layer",
        pools: tuple[BlockPool, BlockPool] | None = None,
    ) -> None:
        self.policy = SinkWindowPolicy(config.sink_tokens, config.residual_window, config.block_size)
        self.tokens = config.tokens
        transforms = (key_transform, value_transform)
        self.placement: SequencePlacement | PolicyPlacement = (
            SequencePlacement(config, transforms, name, pools)
            if config.tokens is None
            else PolicyPlacement(config, transforms, name)
        )
        self.sink_k, self.sink_v = ExactBuffer(config.sink_tokens), ExactBuffer(config.sink_tokens)
        # the window holds exactly its tokens (a reallocation of at most one window per step), so the
        # bytes held are a function of the token count alone, short sequences included
        self.window = Staging(max(config.residual_window, config.block_size), f"{name} window")
        # tokens not yet placed: not yet accepted while recording the past, or (token policies) not
        # yet read by the attention
        self.pending_k, self.pending_v = ExactBuffer(None, step=16), ExactBuffer(None, step=16)
        self.record_past = False
        self.name = name
        self.exact_dtype_choice = config.exact_dtype  # CacheConfig.exact_dtype, see `exact_dtype_for`
        self.exact_dtype: torch.dtype | None = None  # None: the dtype of the incoming tokens
        self.row_sinks = RowSinks(
            config.sink_tokens
        )  # where rows start, and their first real tokens, if padded
        self._planned: tuple[tuple[int, int, int], TokenPlan] | None = None  # `_plan`'s memo
        preferred = self.placement.preferred_dtype
        self.set_exact_dtype(None if preferred is None else getattr(torch, preferred))

    # --- sizes and views of the strategy -------------------------------------------------------------
    @property
    def window_k(self) -> ExactBuffer:
        return self.window.key

    @property
    def window_v(self) -> ExactBuffer:
        return self.window.value

    @property
    def packed_k(self) -> PagedStore | ExactChunks:
        """The packed history's keys (plain strategy; the low class of a token policy)."""
        return self.placement.history.pages_k

    @property
    def packed_v(self) -> PagedStore | ExactChunks:
        return self.placement.history.pages_v

    @property
    def classes(self) -> dict[Precision, PackedClass | ExactClass]:
        """The stores of the placed tokens by precision class (plain: the history is ``LOW``)."""
        return self.placement.classes

    @property
    def counts(self) -> Counts:
        """Tokens decided so far per row by the token policy, per budgeted class."""
        return self.placement.counts

    @property
    def roles(self) -> torch.Tensor | None:
        return self.placement.roles

    def set_roles(self, roles: torch.Tensor) -> None:
        """Token roles (batch, tokens) int8 (`policies.Role`) of the prompt; ValueError without a
        token policy."""
        self.placement.set_roles(roles)

    @property
    def positional(self) -> bool:
        """Whether stored column ``c`` is token ``c`` (plain strategy): what rollback (`crop`) and the
        row sinks of left-padded batches need; token policies move and drop tokens."""
        return self.placement.positional

    @property
    def num_tokens(self) -> int:
        """Tokens held (pending ones included)."""
        return (
            self.sink_k.num_tokens
            + self.placement.num_tokens
            + self.window.num_tokens
            + self.pending_k.num_tokens
        )

    @property
    def num_seen(self) -> int:
        """Tokens ever stored (positions): `num_tokens` plus the evicted ones."""
        return self.num_tokens + self.placement.num_evicted

    @property
    def batch_size(self) -> int:
        """Batch size of the held tokens (0 when empty)."""
        for buf in (self.sink_k, self.window_k, self.pending_k):
            if buf.data is not None:
                return buf.data.shape[0]
        return self.placement.batch_size

    # --- exact dtype ---------------------------------------------------------------------------------
    def exact_dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The exact dtype of this store in a model computing in ``model_dtype``: ``CacheConfig.exact_dtype``
        ("auto" takes the token policy's ``exact_dtype`` when it names one, else 16 bits for a float32
        model when the strategy quantizes or evicts: a cache that keeps everything exact keeps the
        model's dtype and reproduces DynamicCache)."""
        choice = self.exact_dtype_choice
        if choice == "auto" and self.placement.preferred_dtype is not None:
            choice = self.placement.preferred_dtype
        return exact_storage_dtype(choice, model_dtype, self.placement.lossy)

    def set_exact_dtype(self, dtype: torch.dtype | None) -> None:
        """Store every token in ``dtype`` from now on (``CacheConfig.exact_dtype``: float16 for a
        float32 model); tokens are rounded to it before they are stored or quantized, so the packed
        blocks do not depend on whether a token passed through the window. Held exact tokens are
        converted (frozen chunks of an exact class keep theirs)."""
        self.exact_dtype = dtype
        for buf in (self.sink_k, self.sink_v, self.pending_k, self.pending_v):
            buf.set_dtype(dtype)
        self.window.set_dtype(dtype)
        self.placement.set_dtype(dtype)

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

    # --- writing -------------------------------------------------------------------------------------
    def observe_positions(self, position_ids: torch.Tensor | None, batch: int | None = None) -> None:
        """Note each row's first real token from the ``position_ids`` (batch, n) of the next tokens of a
        batch of ``batch`` rows (left-padded batches, `RowSinks`)."""
        self.row_sinks.observe(position_ids, self.num_tokens, batch)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim), rounded to the exact
        dtype. They are placed now, or wait in ``pending`` for `settle`: while recording the past
        (until accepted), and with a token policy (until the attention has read them, `commit`)."""
        key, value = self._to_exact(key), self._to_exact(value)
        self.row_sinks.append(key, value, self.num_tokens)
        if self.record_past or self.placement.defers:
            self.pending_k.append(key)
            self.pending_v.append(value)
            self.placement.stashed(key)
            return
        self._place(key, value)

    def commit(self, query: torch.Tensor | None = None, scaling: float = 1.0) -> None:
        """Called once the attention has read this step's parts (`AttentionParts.finish`, or right
        after the reference read without ``query``): a token policy's attention scorer observes
        ``query`` (batch, q_heads, n, head_dim), the new tokens' queries, then the new tokens are
        placed. A no-op for the plain strategy (placed by `append`, or waiting for `crop`)."""
        if not self.placement.defers or self.record_past:
            return
        new = self.pending_k.view()
        if query is not None and new is not None:
            self.placement.observe(query, self.sink_k.view(), self.window_k.view(), new, scaling)
        self.settle()

    def settle(self) -> None:
        """Place the pending tokens as an ordinary append would (a no-op when none)."""
        pending_k, pending_v = self.pending_k.view(), self.pending_v.view()
        if pending_k is None:
            return
        self.pending_k.clear()
        self.pending_v.clear()
        self._place(pending_k, pending_v)

    def _place(self, key: torch.Tensor, value: torch.Tensor) -> None:
        plan = self._plan(key.shape[-2])
        s = plan.to_sinks
        if s:
            self.placement.took_sinks(self.window.num_tokens, s)
            self.sink_k.append(key[:, :, :s])
            self.sink_v.append(value[:, :, :s])
        first = self.num_seen - self.window.num_tokens  # seen position of the oldest window token
        leaving = self.window.push((key[:, :, s:], value[:, :, s:]), plan.to_quantize)
        if leaving is not None:
            key, value = self._fill_padding(leaving[0], leaving[1], first)
            self.placement.place(key, value, first, self._padding_blocks(first, plan.to_quantize))

    def _fill_padding(
        self, key: torch.Tensor, value: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``, ``value`` (batch, kv_heads, n, head_dim) leaving the window from column ``first`` on,
        with each row's left padding replaced by its first real token: a block that is partly padding
        then quantizes with scales and zero points of its real tokens alone (the padding's keys and
        values depend on the pad token, which must not change a row's answer). Unchanged when no row
        is padded here."""
        starts = self.row_sinks.starts
        if starts is None or not self.positional:
            return key, value
        n = key.shape[-2]
        cols = torch.arange(n, device=key.device)
        src = torch.maximum(cols[None, :], (starts.to(key.device) - first)[:, None]).clamp(max=n - 1)
        if bool((src == cols).all()):
            return key, value
        index = src[:, None, :, None].expand(key.shape[0], key.shape[1], n, key.shape[-1])
        return key.gather(2, index), value.gather(2, index)

    def _padding_blocks(self, first: int, n: int) -> torch.Tensor | None:
        """Which of the ``n / block_size`` blocks leaving the window from column ``first`` on hold only
        left padding, per row (batch, n / block_size) bool; None when no row is padded (or the store
        is not positional: token policies refuse padded batches)."""
        starts = self.row_sinks.starts
        if starts is None or not self.positional:
            return None
        bs = self.policy.block_size
        ends = first + bs * torch.arange(1, n // bs + 1, device=starts.device)  # column after each block
        return ends[None, :] <= starts[:, None]

    def appends_to_window(self) -> bool:
        """Whether storing one more token is a plain append to the residual window: no token policy,
        nothing pending or recorded, no left-padded rows, the sinks full and no block leaving the window
        (the engine's decode path, `integrations.ragged_decode`, then reads and appends directly)."""
        if self.record_past or self.placement.defers or self.pending_k.num_tokens or self.row_sinks.active:
            return False
        plan = self._plan(1)
        return plan.to_sinks == 0 and plan.to_quantize == 0

    def append_to_window(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one token ``key``, ``value`` (batch, kv_heads, 1, head_dim), already rounded to the exact
        dtype and checked against its range, after `appends_to_window` said so."""
        self.window.key.append(key)
        self.window.value.append(value)

    # --- reading -------------------------------------------------------------------------------------
    def draft_reads(self, key: torch.Tensor, value: torch.Tensor, chunk: int) -> DraftReads | None:
        """What plain decoding reads quantized among the tokens this store still holds exact, for a
        forward of new tokens ``key``, ``value`` (batch, kv_heads, n, head_dim) whose first ``chunk``
        tokens are read as one chunk (a prompt: they see the store as it is) and the rest one by one
        (drafts under verification: query i sees the store after ``i`` more tokens). None when no
        block would be flushed before the last query. Call after `settle`, before `append` (plain
        strategy: assisted decoding records the past)."""
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
        """The held tokens for a read over the new ``key``, ``value`` (batch, kv_heads, n, head_dim), as
        (keys, values, num_tokens): ``[sinks | placed tokens | residual window]`` (plain: the packed
        history in sequence order; token policies: every class, in any order since keys are read
        post-RoPE). Read in place: sinks and blocks are only ever written past what is returned, and
        the window is cloned (at most ``residual_window`` tokens) when appending these tokens rewrites
        it before the attention reads. Call after `settle`, before `append` of the same tokens (which
        reuses this plan); pending tokens are not part of it."""
        out: list[SegmentTuple] = []
        if self.sink_k.num_tokens:
            out.append(
                (ExactTensor(self.sink_k.view()), ExactTensor(self.sink_v.view()), self.sink_k.num_tokens)
            )
        out += self.placement.segments()
        window_k, window_v = self.window_k.view(), self.window_v.view()
        if window_k is not None:
            rewrites = not self.placement.defers and self._plan(key.shape[-2]).to_quantize
            if rewrites:  # the append rewrites the window buffer in place
                window_k, window_v = window_k.clone(), window_v.clone()
            out.append((ExactTensor(window_k), ExactTensor(window_v), window_k.shape[-2]))
        return out

    def row_sink_view(self) -> RowSinkView | None:
        """The exact first real tokens of left-padded rows, for a read before the next `append` (None
        while no row is padded); readers put them back over their quantized columns."""
        return self.row_sinks.view(self.num_tokens)

    def restore_(self, part: Page, index: int, out: torch.Tensor) -> torch.Tensor:
        """In place: undo the page transform (pre-RoPE, rotation) of the keys (``index`` 0) or values (1)
        on ``out``, ``part`` of `segments` dequantized; only packed blocks are transformed."""
        self.placement.restore_(part, index, out)
        return out

    def read_transform(self, part: Page, index: int) -> PartTransform | None:
        """The page transform of keys (``index`` 0) or values (1) ``part`` of `segments`, for readers
        that undo it themselves (the fused kernels); None when the part is stored untransformed."""
        return self.placement.read_transform(part, index)

    def _plan(self, n: int) -> TokenPlan:
        """The policy's plan for appending ``n`` tokens to the held ones (computed once per step)."""
        args = (self.sink_k.num_tokens, self.window.num_tokens, n)
        if self._planned is None or self._planned[0] != args:
            self._planned = (args, self.policy.plan(*args))
        return self._planned[1]

    def packed_tokens_for(self, num_tokens: int) -> int:
        """Tokens that left the window after ``num_tokens`` tokens were appended, in any chunks."""
        plan = self.policy.plan(0, 0, num_tokens)
        return plan.to_quantize

    # --- rollback (plain strategy) -------------------------------------------------------------------
    def check_crop(self, num_remove: int) -> None:
        """Raise ValueError when removing the newest ``num_remove`` tokens cannot leave the state of a
        store that never saw them: a packed block holds one of them, or was flushed because of them
        (only a store recording the past, `record_past`, can roll back every step exactly), or the
        store places tokens by a token policy (not `positional`)."""
        if not 0 <= num_remove <= self.num_tokens:
            raise ValueError(f"crop: {num_remove} tokens to remove; allowed: 0 to {self.num_tokens}")
        if num_remove and not self.positional:
            raise ValueError(f"crop: {num_remove} tokens of {self.name}, whose token policy cannot roll back")
        rest = num_remove - min(num_remove, self.pending_k.num_tokens)
        if not rest:
            return
        packed = self.placement.num_tokens
        removable = self.window.num_tokens + (0 if packed else self.sink_k.num_tokens)
        kept = self.num_tokens - num_remove
        if rest > removable or self.packed_tokens_for(kept) != packed:
            raise ValueError(
                f"crop: removing {num_remove} tokens reaches tokens already quantized into packed blocks "
                f"({packed} packed, {self.window.num_tokens} in the residual window); "
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
        from_window = min(rest, self.window.num_tokens)
        self.window.truncate(from_window)
        self.sink_k.truncate(rest - from_window)
        self.sink_v.truncate(rest - from_window)
        self.settle()

    # --- bookkeeping ---------------------------------------------------------------------------------
    def token_counts(self) -> dict[str, int]:
        """Tokens held, by part: ``sinks``, ``window`` (pending tokens included), and the strategy's:
        ``packed`` (or ``exact blocks`` when the blocks hold exact values, preset ``none``), or one
        entry per precision class (``exact``, ``high``, ``low``) and ``evicted`` (seen, no longer held)."""
        return {
            "sinks": self.sink_k.num_tokens,
            **self.placement.token_counts(self.num_seen - self.num_tokens),
            "window": self.window.num_tokens + self.pending_k.num_tokens,
        }

    def padding_columns(self) -> int:
        """Columns of left padding summed over the rows (0 unless the batch is left-padded): stored
        columns that are not tokens of their row."""
        starts = self.row_sinks.starts
        return 0 if starts is None else int(starts.clamp(max=self.num_tokens).sum())

    def parts(self) -> dict[str, int]:
        """Bytes held, by part: ``sinks`` (row sinks included), the strategy's (``packed_keys``,
        ``packed_values``, ``block_tables``; or per class ``<class>_keys``, ``<class>_values`` and
        ``<class>_staging``, and the token policy's ``scores`` and roles), and ``residual`` (the window and the pending tokens)."""
        return {
            "sinks": self.sink_k.nbytes + self.sink_v.nbytes + self.row_sinks.nbytes,
            **self.placement.parts(),
            "residual": self.window.nbytes + self.pending_k.nbytes + self.pending_v.nbytes,
        }

    @property
    def nbytes(self) -> int:
        return sum(self.parts().values())

    def constants(self) -> list[torch.Tensor]:
        """Tensors the page transforms hold (rotation, RoPE frequencies), possibly shared with other
        stores: a cache counts them once."""
        return self.placement.constants()

    def buffers(self) -> list:
        return [
            self.sink_k,
            self.sink_v,
            *self.window.buffers(),
            self.pending_k,
            self.pending_v,
            *self.placement.buffers(),
            self.row_sinks,
        ]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in (self.sink_k, self.sink_v, self.window, self.pending_k, self.pending_v, self.row_sinks):
            buf.map_batch(fn)
        self.placement.map_batch(fn)

    def clear(self) -> None:
        for buf in (self.sink_k, self.sink_v, self.window, self.pending_k, self.pending_v, self.row_sinks):
            buf.clear()
        self.placement.clear()

    # --- persistence ---------------------------------------------------------------------------------
    def _parts(self) -> list[tuple[str, object]]:
        return [
            ("sinks.keys", self.sink_k),
            ("sinks.values", self.sink_v),
            ("window", self.window),
            ("pending.keys", self.pending_k),
            ("pending.values", self.pending_v),
            ("row_sinks", self.row_sinks),
        ]

    def save_state(self, state: StateDict) -> None:
        """Everything held, so that `load_state` gives back a store that reads and continues bit for
        bit like this one: ``exact_dtype``, ``num_tokens`` and ``num_seen`` (checked on load), the
        exact parts (``sinks``, ``window``, ``pending``, ``row_sinks``) and the placement's (the packed
        ``history``, or a token policy's classes and scores). See docs/persistence.md for the names."""
        state.set("exact_dtype", dtype_name(self.exact_dtype))
        state.set("num_tokens", self.num_tokens)
        state.set("num_seen", self.num_seen)
        for name, part in self._parts():
            part.save_state(state.child(name))
        self.placement.save_state(state)

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        """Hold what `save_state` wrote, on ``device``. Call on an empty store built from the same
        config (ValueError otherwise); StateError when the saved parts do not add up to the saved counts."""
        if self.num_seen:
            raise ValueError(
                f"{self.name}: load_state needs an empty store; this one holds {self.num_seen} tokens"
            )
        self.set_exact_dtype(dtype_of(state.get("exact_dtype"), state.name("exact_dtype")))
        for name, part in self._parts():
            part.load_state(state.child(name), device)
        self.placement.load_state(state, device)
        self._planned = None
        held, seen = state.count("num_tokens"), state.count("num_seen")
        if (self.num_tokens, self.num_seen) != (held, seen):
            found = (self.num_tokens, self.num_seen)
            self.clear()
            raise StateError(
                f"state: {state.prefix.rstrip('.')} holds {found[0]} tokens of {found[1]} seen; its counts say "
                f"{held} of {seen}"
            )
