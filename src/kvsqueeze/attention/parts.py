"""`AttentionParts`: one layer's keys and values for one attention call, read in place.

Order: `LayerStore.segments` (``[sinks | placed tokens | residual window]``), then the new tokens, as
`Segment` runs
whose keys and values each have one storage format (`ExactTensor` or `PackedTensor`). The new
tokens and the residual window are exact, as in the reference path (`reference.materialize`).

`snapshot` captures the parts *before* ``store.append`` of the new tokens, without copying the
history: sinks and pages are only ever written past what is captured, and the residual window is
cloned (at most ``residual_window`` tokens) only in the steps where the append rewrites it. Once the
attention has read them it calls `AttentionParts.finish`, which lets the store `commit` the step
(a token policy's attention scorer observes the queries, then the new tokens are placed).

Verification reads (`storage.layer.DraftReads`, assisted decoding): tokens some queries must read
quantized while the store still holds them exact join as one more exact segment of their
dequantized copies, and the mask shows each query one of the two copies (`kernel_inputs`,
`dense_inputs`). Only the kvsqueeze attention applies that mask; any other operation reads the
exact copies (`dense` warns once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.dequantize import dequantize_into
from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..storage.layer import DraftReads, LayerStore
from ..storage.row_sinks import RowSinkView
from ..storage.transform import PartTransform
from .reference import Workspace

Part = PackedTensor | ExactTensor


@dataclass(frozen=True)
class Segment:
    """``num_tokens`` tokens of keys and values, each (batch, kv_heads, >= num_tokens, head_dim).

    A page may hold more tokens than are used; only the first ``num_tokens`` belong to the segment.
    ``key_transform``, ``value_transform``: the page transform the stored keys / values went through
    (rotation, pre-RoPE keys; `LayerStore.read_transform`), which every reader undoes; None when they
    are stored as the model computed them.
    """

    key: Part
    value: Part
    num_tokens: int
    key_transform: PartTransform | None = None
    value_transform: PartTransform | None = None

    def transform(self, index: int) -> PartTransform | None:
        """The transform of the keys (``index`` 0) or the values (1)."""
        return self.key_transform if index == 0 else self.value_transform


@dataclass
class AttentionParts:
    """The segments of one layer for one step; the last segment holds the new tokens.

    ``shape`` is (batch, kv_heads, total_tokens, head_dim) and ``dtype`` the new tokens' dtype.
    `dense` dequantizes everything into the reference path's workspace (the fallback when an
    operation other than the kvsqueeze attention reads the keys or values).
    """

    segments: tuple[Segment, ...]
    workspace: Workspace
    on_finish: Callable[[torch.Tensor, float], None] | None = field(default=None, repr=False)
    row_sinks: RowSinkView | None = field(default=None, repr=False)
    drafts: DraftReads | None = field(default=None, repr=False)
    kernel: bool = True  # False: the segments are the reference path's dense tensors (read them densely)
    _dense: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def finish(self, query: torch.Tensor, scaling: float) -> None:
        """Called by the attention once it has read the parts, with its query (batch, q_heads, q_len,
        head_dim): the store then commits the step (`LayerStore.commit`: a token-policy layer scores
        and places its new tokens)."""
        if self.on_finish is not None:
            self.on_finish(query, scaling)

    @property
    def new(self) -> Segment:
        return self.segments[-1]

    @property
    def history(self) -> tuple[Segment, ...]:
        return self.segments[:-1]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def shape(self) -> torch.Size:
        b, h, _, d = self.new.key.values.shape
        return torch.Size((b, h, self.num_tokens, d))

    @property
    def dtype(self) -> torch.dtype:
        return self.new.key.values.dtype

    @property
    def device(self) -> torch.device:
        return self.new.key.values.device

    def dense(self, index: int) -> torch.Tensor:
        """Keys (``index`` 0) or values (1), (batch, kv_heads, total_tokens, head_dim), dequantized.
        With verification reads (`drafts`), every query then sees their exact copies: warns once."""
        if self.drafts is not None:
            warnings.warn(DRAFT_READS_WARNING, DraftReadsWarning, stacklevel=2)
        return self._dense_of(index)

    def _dense_of(self, index: int) -> torch.Tensor:
        if not self.history:
            return (self.new.key, self.new.value)[index].values
        if index not in self._dense:
            out = self.workspace.get(self.new.key.values, self.num_tokens)[index]
            pos = 0
            for seg in self.segments:
                part, rows = (seg.key, seg.value)[index], out[:, :, pos : pos + seg.num_tokens]
                dequantize_into(part.slice_tokens(0, seg.num_tokens), rows)
                if seg.transform(index) is not None:
                    seg.transform(index).restore_(rows)
                pos += seg.num_tokens
            if self.row_sinks is not None:
                self.row_sinks.overlay(out, index)
            self._dense[index] = out
        return self._dense[index]

    def dense_inputs(
        self, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values (batch, kv_heads, total_tokens [+ F], head_dim) and mask for a dense attention:
        `dense`, plus the F copies of the verification reads (`drafts`) as extra columns that the
        mask shows to the queries that read them quantized (and hides their exact columns from)."""
        key, value = self._dense_of(0), self._dense_of(1)
        if self.drafts is None:
            return key, value, attention_mask
        d = self.drafts
        mask = _with_drafts(attention_mask, d, self.num_tokens)
        return (
            torch.cat([key, d.key.to(key.dtype)], -2),
            torch.cat([value, d.value.to(value.dtype)], -2),
            mask,
        )

    def kernel_inputs(
        self, attention_mask: torch.Tensor | None
    ) -> tuple[tuple[Segment, ...], torch.Tensor | None]:
        """Segments and mask for a fused kernel. Verification reads (`drafts`) join as an exact
        segment, as in `dense_inputs`. With row sinks (a left-padded batch), their exact copies join
        as a last segment, visible where their stored columns were, and the mask hides those
        columns. Raises ValueError when row sinks come without a mask (padding needs one)."""
        segments = self.segments
        if self.drafts is not None:
            d = self.drafts
            attention_mask = _with_drafts(attention_mask, d, self.num_tokens)
            segments = (*segments, Segment(ExactTensor(d.key), ExactTensor(d.value), d.key.shape[-2]))
        view = self.row_sinks
        if view is None:
            return segments, attention_mask
        if attention_mask is None:
            raise ValueError("attention_mask: None with left-padded rows; allowed: the padding mask")
        b, sinks = view.columns.shape
        mask = attention_mask.expand(b, -1, -1, -1)
        index = view.columns[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], sinks)
        valid = view.valid[:, None, None, :].expand_as(index)
        hidden = (
            torch.zeros((), dtype=mask.dtype)
            if mask.dtype == torch.bool
            else torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype)
        )
        extra = torch.where(valid, mask.gather(-1, index), hidden)
        mask = mask.clone()
        mask.scatter_(-1, index, torch.where(valid, hidden, mask.gather(-1, index)))
        segment = Segment(ExactTensor(view.key), ExactTensor(view.value), sinks)
        return (*segments, segment), torch.cat([mask, extra], dim=-1)


class DraftReadsWarning(UserWarning):
    """An attention other than kvsqueeze's read a verification forward (see `AttentionParts.dense`)."""


DRAFT_READS_WARNING = (
    "assisted decoding: this attention read the drafts of a verification forward over tokens that plain "
    "decoding would already read from quantized blocks, as exact tokens; the output can differ from plain "
    "greedy decoding with this cache. For token-for-token equality load the model with "
    "attn_implementation='kvsqueeze' (or call kvsqueeze.use_fused_attention(model))"
)


def _hidden(mask: torch.Tensor) -> torch.Tensor:
    """The value of ``mask``'s dtype that hides a key: False, or the dtype's minimum."""
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    return torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)


def _with_drafts(mask: torch.Tensor | None, drafts: DraftReads, total: int) -> torch.Tensor:
    """``mask`` (batch | 1, heads | 1, q_len, total) — None: causal, query i seeing keys up to
    ``total - q_len + i`` — with F more columns for the quantized copies of ``drafts``: column
    ``total + j`` shows copy j to the queries that read it quantized (``j < counts[i]``, where its
    stored column was visible to them) and the stored column ``drafts.column + j`` is hidden from
    them."""
    q_len, flushed = drafts.counts.numel(), drafts.key.shape[-2]
    if mask is None:
        mask = torch.ones(q_len, total, dtype=torch.bool, device=drafts.key.device).tril(total - q_len)
        mask = mask[None, None]
    mask = mask.expand(*mask.shape[:2], q_len, total)
    quantized = torch.arange(flushed, device=mask.device)[None, :] < drafts.counts.to(mask.device)[:, None]
    columns = slice(drafts.column, drafts.column + flushed)
    stored, hidden = mask[..., columns], _hidden(mask)
    mask = mask.clone()
    mask[..., columns] = torch.where(quantized, hidden, stored)
    return torch.cat([mask, torch.where(quantized, stored, hidden)], dim=-1)


def snapshot(
    store: LayerStore,
    key: torch.Tensor,
    value: torch.Tensor,
    workspace: Workspace,
    drafts: DraftReads | None = None,
) -> AttentionParts:
    """The parts for attention over ``store`` plus the new ``key``, ``value`` (batch, kv_heads, n,
    head_dim), with the verification reads ``drafts`` of `LayerStore.draft_reads`. Must be called
    before ``store.append`` of the same tokens; `AttentionParts.finish` commits them."""
    segments = [
        Segment(k, v, n, store.read_transform(k, 0), store.read_transform(v, 1))
        for k, v, n in store.segments(key, value)
    ]
    segments.append(_exact(key, value))
    return AttentionParts(
        tuple(segments),
        workspace,
        store.commit,
        row_sinks=store.row_sink_view(),
        drafts=drafts,
    )


def dense_parts(
    keys: torch.Tensor, values: torch.Tensor, new_tokens: int, workspace: Workspace, drafts: DraftReads
) -> AttentionParts:
    """Parts over the reference path's dense ``keys``, ``values`` (batch, kv_heads, held + new_tokens,
    head_dim, from `reference.materialize`) with verification reads: read densely, never by a kernel
    (the reference path computes with dense attention)."""
    held = keys.shape[-2] - new_tokens
    segments = (
        _exact(keys[:, :, :held], values[:, :, :held]),
        _exact(keys[:, :, held:], values[:, :, held:]),
    )
    return AttentionParts(
        segments if held else segments[1:],
        workspace,
        drafts=drafts,
        kernel=False,
        _dense={0: keys, 1: values},
    )


def _exact(key: torch.Tensor, value: torch.Tensor) -> Segment:
    return Segment(ExactTensor(key), ExactTensor(value), key.shape[-2])
