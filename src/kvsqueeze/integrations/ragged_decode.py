"""The decode tokens of a ragged batch: read and stored with the least work per sequence and layer.

In a serving step most sequences decode one token. Through the general path
(`SqueezedLayer.update` → `attention.parts.snapshot` → `kvsqueeze_attention` → `kernels.cpu`) each of
them costs a few hundred microseconds of Python per layer — checks for prompt chunks, rollback, token
policies and padded rows, a fresh description of every stored segment for the kernel — which at 16
sequences × 30 layers is more than the model's own matrix products. `DecodeReader` takes the common
case the short way, with the same result to the bit:

* `DecodeReader.eligible`: a layer on the fused CPU path whose store appends one token to its exact
  residual window and nothing else (`LayerStore.appends_to_window`: no token policy, no pending or
  recorded tokens, no padded rows, sinks full, no block leaving the window). Anything else — the
  step in 64 where a block leaves the window, prompt chunks, token policies — takes the general path.
* `DecodeReader.inputs` + `DecodeReader.attend`: one call of the native kernel for every decode
  token of the layer (``fused_attention_many``: the sequences spread over the threads), each over
  ``[sinks | paged blocks | window | new token]``, the segments and order of the general path, planned
  as a call of its own would be (so the same floating-point sums, the same result to the bit). The
  description of the paged blocks (`kernels.sources.source_meta`, with the page transform the
  kernel undoes: rotation, pre-RoPE keys) is kept per store and reused while its block table
  buffer, slabs and token count are unchanged (a decode step changes none of them); sinks, window
  and the new token are described afresh (two integers each).
* Then the token, rounded to the exact dtype once for the whole batch (`DecodeReader.exact_states`:
  one range check per layer instead of one per sequence), joins the window
  (`LayerStore.append_to_window`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import sources
from ..kernels.build import cpu_extension
from ..quant.paged import PagedPart
from ..storage.layer import LayerStore
from ..storage.pages import PagedStore
from ..storage.placement import SequencePlacement
from ..storage.transform import PartTransform


@dataclass
class Problem:
    """One decode token's read: ``query`` (1, q_heads, 1, head_dim), the kernel's tensor list, meta
    rows (`kernels.sources`) and tokens per segment."""

    query: torch.Tensor
    tensors: list[torch.Tensor]
    meta: list[int]
    tokens: list[int]


def _same(a: tuple, b: tuple) -> bool:
    """Equal keys of `DecodeReader._paged_source`: the same table buffer and first slab (objects), the
    same slab and token counts."""
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


class DecodeReader:
    """Reads one decode token per sequence of a layer with the native CPU kernel (see the module)."""

    def __init__(self) -> None:
        self.ext = cpu_extension()
        self.tables = sources.fp8_tables() if self.ext is not None else None
        # PagedStore -> ((table buffer, slabs, tokens), tensors, row): the kernel's view of its blocks
        self._paged: weakref.WeakKeyDictionary[PagedStore, tuple] = weakref.WeakKeyDictionary()

    def eligible(self, layer: Any, query: torch.Tensor) -> bool:
        """Whether `inputs` and `attend` serve ``layer`` (a `SqueezedLayer`) this step."""
        store = getattr(layer, "store", None)
        return (
            self.ext is not None
            and query.device.type == "cpu"
            and query.dtype in sources.FLOAT_DTYPES
            and getattr(layer, "fused", False)
            and layer.is_initialized
            and isinstance(store, LayerStore)
            and isinstance(store.placement, SequencePlacement)
            and not store.placement.history.staging.num_tokens
            and store.appends_to_window()
        )

    def _paged_source(self, pages: PagedStore, tensors: list[torch.Tensor]) -> list[int] | None:
        """The meta row of ``pages``' blocks (tensors appended to ``tensors``), None when it holds none."""
        num_tokens, ids = pages.num_tokens, pages.tables.ids
        if not num_tokens or ids is None:
            return None
        slabs = pages.pool.slabs
        key = (ids, len(slabs), slabs[0] if slabs else None, num_tokens)
        held = self._paged.get(pages)
        if held is None or not _same(held[0], key):
            part = PagedPart(tuple(slabs), ids, pages.block_size, pages.pool.per_slab, num_tokens)
            own: list[torch.Tensor] = []
            # the history's page transform (rotation, pre-RoPE keys), undone in the kernel; its tokens
            # are contiguous from packed index 0 (`PackedClass.read_transform`)
            transform = None if pages.transform is None else PartTransform(pages.transform, 0)
            row = sources.source_meta(part, own, transform)
            held = (key, own, row)
            self._paged[pages] = held
        _, own, row = held
        base = len(tensors)
        tensors += own
        return sources.shift_row(row, base)

    def inputs(
        self, store: LayerStore, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> Problem:
        """The kernel's inputs for ``query`` (1, q_heads, 1, head_dim) over ``store``'s held tokens and
        the new ``key``, ``value`` (1, kv_heads, 1, head_dim, the model's dtype): ``[sinks | paged
        blocks | window | new token]``, as the general path orders them. Call before the token is stored."""
        tensors: list[torch.Tensor] = []
        meta: list[int] = []
        tokens: list[int] = []
        sinks = store.sink_k.num_tokens
        if sinks:
            tensors += (store.sink_k.data, store.sink_v.data)
            meta += sources.exact_row(0) + sources.exact_row(1)
            tokens.append(sinks)
        history = store.placement.history
        row_k = self._paged_source(history.pages_k, tensors)
        if row_k is not None:
            row_v = self._paged_source(history.pages_v, tensors)
            meta += row_k + row_v
            tokens.append(history.pages_k.num_tokens)
        window = store.window.num_tokens
        if window:
            n = len(tensors)
            tensors += (store.window.key.data, store.window.value.data)
            meta += sources.exact_row(n) + sources.exact_row(n + 1)
            tokens.append(window)
        n = len(tensors)
        tensors += (key, value)
        meta += sources.exact_row(n) + sources.exact_row(n + 1)
        tokens.append(1)
        return Problem(query if query.stride(-1) == 1 else query.contiguous(), tensors, meta, tokens)

    def attend(self, problems: list[Problem], scaling: float) -> list[torch.Tensor]:
        """Causal attention of every problem of `inputs`, in one kernel call (the problems spread over
        the threads, each computed as a call of its own would) -> one (1, 1, q_heads, head_dim) each."""
        return self.ext.fused_attention_many(
            [p.query for p in problems],
            [p.tensors for p in problems],
            [p.meta for p in problems],
            [p.tokens for p in problems],
            float(scaling),
            self.tables,
        )

    @staticmethod
    def exact_states(states: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
        """``states`` (1, kv_heads, T, head_dim) rounded to ``dtype`` (None: as they are), or None when
        some finite value leaves its range (the general path then warns and widens the store)."""
        if dtype is None or states.dtype == dtype:
            return states
        limit = torch.finfo(dtype).max
        if bool((states.abs() > limit).any()) and bool(torch.isfinite(states).all()):
            return None
        return states.to(dtype)
