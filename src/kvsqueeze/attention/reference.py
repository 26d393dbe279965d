"""Reference read path: dequantize one layer's history into transient buffers.

`materialize` returns full-precision keys and values for the layer being computed, in the order of
`LayerStore.segments` (``[sinks | placed tokens | residual window]``) then the new tokens, with
every page transform undone (`LayerStore.restore_`), in buffers from the
`Workspace` that live as long as the attention uses them. Any attention implementation can
consume them.
"""

from __future__ import annotations

import torch

from ..kernels.dequantize import dequantize_into
from ..storage.layer import LayerStore


class Workspace:
    """Where the reference path dequantizes one layer's history: (batch, kv_heads, tokens, head_dim)
    key and value buffers allocated per read and freed once the attention is done with them, so
    nothing context-sized outlives a forward (the cache holds only its packed and exact parts).
    ``nbytes`` is 0: it holds nothing between reads."""

    def get(self, like: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers of ``num_tokens`` tokens, shaped and typed like ``like``."""
        b, h, _, d = like.shape
        return tuple(torch.empty(b, h, num_tokens, d, dtype=like.dtype, device=like.device) for _ in range(2))

    @property
    def nbytes(self) -> int:
        return 0


def materialize(
    store: LayerStore, key: torch.Tensor, value: torch.Tensor, workspace: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full keys and values (batch, kv_heads, held + n, head_dim) for attention over the stored
    tokens plus the new ``key``, ``value`` (batch, kv_heads, n, head_dim), which stay exact.

    Must be called before ``store.append`` of the same tokens.
    """
    if store.num_tokens == 0:
        return key, value
    total = store.num_tokens + key.shape[-2]
    out_k, out_v = workspace.get(key, total)
    segments = store.segments(key, value)
    for index, (out, new) in enumerate(((out_k, key), (out_v, value))):
        pos = 0
        for seg in segments:  # natively when the CPU kernels are built (same bits)
            rows = out[:, :, pos : pos + seg[2]]
            store.restore_(seg[index], index, dequantize_into(seg[index], rows))  # transform undone
            pos += seg[2]
        _put(out, pos, new)
    row_sinks = store.row_sink_view()
    if row_sinks is not None:  # left-padded rows: their first real tokens, exact
        row_sinks.overlay(out_k, 0)
        row_sinks.overlay(out_v, 1)
    return out_k, out_v


def _put(out: torch.Tensor, pos: int, part: torch.Tensor | None) -> int:
    """Copy ``part`` into ``out`` at token ``pos``; return the next position."""
    if part is None:
        return pos
    out[:, :, pos : pos + part.shape[-2]].copy_(part)
    return pos + part.shape[-2]
