"""Fused read path: attention computed on the stored codes, no full-precision copy of the history.

For a query (batch, q_heads, q_len, head_dim), a backend walks the segments of `AttentionParts`
in order — exact sinks, packed pages, exact residual window, new tokens — and keeps, per query
row, a running maximum, a running sum and an output accumulator (online softmax); work split
over tokens is merged by log-sum-exp (flash-decoding). Query heads of a GQA group are computed
together against one read of their KV head's codes. Attention-sink logits (GPT-OSS ``s_aux``), one
per query row, join the softmax denominator when a row is written: its output is scaled by
``1 / (1 + exp(sink - lse))``, i.e. ``sigmoid(lse - sink)``.

Backends, by device: ``cpu`` the C++/OpenMP kernel (`kernels.cpu`), ``cuda`` the Triton kernel
(`kernels.triton_attention`, when triton is installed). `fused_backend` returns None where no
backend runs; the caller then takes the reference path (dequantize, then SDPA or
`dense.dense_attention`), never silently: a missing native build warns when it fails
(`kernels.build`), a CUDA device without triton warns here, once per process.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from .parts import AttentionParts

Backend = Callable[..., torch.Tensor]


def fused_backend(device: torch.device) -> Backend | None:
    """The fused attention function for ``device``, or None when none is available there."""
    if device.type == "cpu":
        from ..kernels import cpu

        return cpu.fused_attention if cpu.available() else None
    if device.type == "cuda":
        from ..kernels import triton_attention

        if triton_attention.available():
            return triton_attention.fused_attention
        _warn_no_backend("cuda", "triton is not installed")
        return None
    _warn_no_backend(device.type, "kvsqueeze has fused kernels for cpu and cuda only")
    return None


@functools.cache
def _warn_no_backend(device: str, why: str) -> None:
    warnings.warn(
        f"kvsqueeze attention on {device}: no fused kernel ({why}); reading the cache through the "
        "reference path (dequantize, then attention)",
        RuntimeWarning,
        stacklevel=4,
    )


def fused_attention(
    query: torch.Tensor,
    parts: AttentionParts,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    backend: Backend,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, head_dim) over ``parts``.

    ``attention_mask``: None or (batch | 1, q_heads | 1, q_len, total_tokens), bool (True: attend)
    or additive float, as transformers passes it; ``causal`` is used only without a mask (query
    i then sees tokens up to ``total_tokens - q_len + i``, i.e. causal within a chunk of new
    tokens). ``sinks``: None or (batch, q_heads, q_len) sink logits. Returns (batch, q_len,
    q_heads, head_dim), the layout attention functions return.
    """
    b, hq, _, d = query.shape
    bk, hk, total, dk = parts.shape
    if b != bk or d != dk or hq % hk:
        raise ValueError(
            f"query: shape {tuple(query.shape)} does not fit keys {tuple(parts.shape)}; allowed: same batch and "
            f"head_dim, q_heads a multiple of kv_heads"
        )
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask: {attention_mask.shape[-1]} key positions; expected {total}")
    if sinks is not None and sinks.shape != query.shape[:3]:
        raise ValueError(
            f"sinks: shape {tuple(sinks.shape)}; expected (batch, q_heads, q_len) {tuple(query.shape[:3])}"
        )
    segments, attention_mask = parts.kernel_inputs(attention_mask)  # + row sinks of padded rows
    return backend(query, segments, attention_mask, scaling, causal, sinks)
