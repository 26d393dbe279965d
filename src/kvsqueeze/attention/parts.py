"""`AttentionParts`: one layer's keys and values for one attention call, read in place.

Sequence order: ``[sinks | packed pages | residual window | new tokens]``, as `Segment` runs
whose keys and values each have one storage format (`ExactTensor` or `PackedTensor`). The new
tokens and the residual window are exact, as in the reference path (`reference.materialize`).

`snapshot` captures the parts *before* ``store.append`` of the new tokens, without copying the
history: sinks and pages are only ever written past what is captured, and the residual window is
cloned (at most ``residual_window`` tokens) only in the steps where the append rewrites it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.dequantize import dequantize_into
from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..storage.layer import LayerStore
from ..storage.mixed import MixedLayerStore
from ..storage.row_sinks import RowSinkView
from .reference import Workspace

Part = PackedTensor | ExactTensor


@dataclass(frozen=True)
class Segment:
    """``num_tokens`` tokens of keys and values, each (batch, kv_heads, >= num_tokens, head_dim).

    A page may hold more tokens than are used; only the first ``num_tokens`` belong to the segment.
    """

    key: Part
    value: Part
    num_tokens: int


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
    _dense: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def finish(self, query: torch.Tensor, scaling: float) -> None:
        """Called by the attention once it has read the parts, with its query (batch, q_heads, q_len,
        head_dim): a token-policy layer then scores and settles its new tokens."""
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
        """Keys (``index`` 0) or values (1), (batch, kv_heads, total_tokens, head_dim), dequantized."""
        if not self.history:
            return (self.new.key, self.new.value)[index].values
        if index not in self._dense:
            out = self.workspace.get(self.new.key.values, self.num_tokens)[index]
            pos = 0
            for seg in self.segments:
                part = seg.key if index == 0 else seg.value
                dequantize_into(part.slice_tokens(0, seg.num_tokens), out[:, :, pos : pos + seg.num_tokens])
                pos += seg.num_tokens
            if self.row_sinks is not None:
                self.row_sinks.overlay(out, index)
            self._dense[index] = out
        return self._dense[index]

    def kernel_inputs(
        self, attention_mask: torch.Tensor | None
    ) -> tuple[tuple[Segment, ...], torch.Tensor | None]:
        """Segments and mask for a fused kernel. With row sinks (a left-padded batch), their exact
        copies join as a last segment, visible where their stored columns were, and the mask hides
        those columns. Raises ValueError when row sinks come without a mask (padding needs one)."""
        view = self.row_sinks
        if view is None:
            return self.segments, attention_mask
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
        return (*self.segments, segment), torch.cat([mask, extra], dim=-1)


def snapshot(
    store: LayerStore, key: torch.Tensor, value: torch.Tensor, workspace: Workspace
) -> AttentionParts:
    """The parts for attention over ``store`` plus the new ``key``, ``value`` (batch, kv_heads, n,
    head_dim). Must be called before ``store.append`` of the same tokens."""
    segments: list[Segment] = []
    if store.sink_k.num_tokens:
        segments.append(_exact(store.sink_k.view(), store.sink_v.view()))
    page_tokens, left = store.packed_k.page_tokens, store.packed_k.num_tokens
    for page_k, page_v in zip(store.packed_k.pages, store.packed_v.pages, strict=True):
        if left <= 0:
            break
        segments.append(Segment(page_k, page_v, min(page_tokens, left)))
        left -= page_tokens
    window_k, window_v = store.window_k.view(), store.window_v.view()
    if window_k is not None:
        plan = store.policy.plan(store.sink_k.num_tokens, store.window_k.num_tokens, key.shape[-2])
        if plan.to_quantize:  # the append rewrites the window buffer in place
            window_k, window_v = window_k.clone(), window_v.clone()
        segments.append(_exact(window_k, window_v))
    segments.append(_exact(key, value))
    return AttentionParts(tuple(segments), workspace, row_sinks=store.row_sinks.view(store.num_tokens))


def _exact(key: torch.Tensor, value: torch.Tensor) -> Segment:
    return Segment(ExactTensor(key), ExactTensor(value), key.shape[-2])


def mixed_snapshot(
    store: MixedLayerStore, key: torch.Tensor, value: torch.Tensor, workspace: Workspace
) -> AttentionParts:
    """The parts for attention over a token-policy ``store`` plus the new ``key``, ``value``
    (batch, kv_heads, n, head_dim); segments in any class order, the new tokens last. Must be called
    before ``store.stash`` of the same tokens; the store is not modified until `AttentionParts.finish`."""
    segments = [Segment(k, v, n) for k, v, n in store.segments()]
    segments.append(_exact(key, value))

    def finish(query: torch.Tensor, scaling: float) -> None:
        store.observe(query, scaling)
        store.settle()

    return AttentionParts(tuple(segments), workspace, finish)
