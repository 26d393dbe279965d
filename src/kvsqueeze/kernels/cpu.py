"""Python face of the C++/OpenMP CPU kernels: fused attention over segments, page dequantization.

Both functions raise ValueError for inputs the C++ code does not take (other devices, dtypes,
shapes); the per-tensor layout (4-D, contiguous rows) is checked in C++ (TORCH_CHECK), since the
pages `PagedStore` builds always have it and this runs once per layer and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from .build import cpu_extension
from .sources import FLOAT_DTYPES, fp8_tables, source_meta

if TYPE_CHECKING:
    from ..storage.transform import PartTransform

KEY_DOTS = ("float", "avx2", "vnni")  # csrc/dispatch.h: KeyDot


class SegmentLike(Protocol):
    key: PackedTensor | ExactTensor | PagedPart
    value: PackedTensor | ExactTensor | PagedPart
    num_tokens: int
    key_transform: PartTransform | None
    value_transform: PartTransform | None


def available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on first call)."""
    return cpu_extension() is not None


def fused_attention(
    query: torch.Tensor,
    segments: Sequence[SegmentLike],
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, head_dim) over the keys and values of
    ``segments`` in order, each (batch, kv_heads, >= num_tokens, head_dim), read in place; a
    `PagedPart` through its block table (``num_tokens`` a whole number of its blocks). Any packed
    format (integer, FP8, codebook levels, outlier side stores); a segment's ``key_transform`` /
    ``value_transform`` (rotation, pre-RoPE keys; missing attributes: none) is undone in the kernel.

    ``attention_mask``: None or (batch | 1, q_heads | 1, q_len, total_tokens), bool (True: attend)
    or additive float. ``causal`` applies when the mask is None: query i sees tokens up to
    ``total_tokens - q_len + i``. ``sinks``: None or (batch, q_heads, q_len) sink logits, one extra
    logit per query row in the softmax denominator whose value is zero (GPT-OSS ``s_aux``).
    Returns (batch, q_len, q_heads, head_dim) in the query's dtype.
    """
    ext = cpu_extension()
    if ext is None:
        raise ValueError("kernel: the native CPU kernels are not available (see the build warning)")
    if query.device.type != "cpu" or query.dtype not in FLOAT_DTYPES or query.dim() != 4:
        raise ValueError(
            f"query: {query.dtype} on {query.device} {tuple(query.shape)}; allowed: 4-D float on cpu"
        )
    if query.stride(-1) != 1:
        query = query.contiguous()
    tensors: list[torch.Tensor] = []
    meta: list[int] = []
    for seg in segments:
        meta += source_meta(seg.key, tensors, getattr(seg, "key_transform", None))
        meta += source_meta(seg.value, tensors, getattr(seg, "value_transform", None))
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != sum(s.num_tokens for s in segments):
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)}; allowed: (batch|1, heads|1, q_len, total_tokens)"
            )
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.float()
    if sinks is not None:
        if sinks.shape != query.shape[:3]:
            raise ValueError(
                f"sinks: shape {tuple(sinks.shape)}; allowed: (batch, q_heads, q_len) = {tuple(query.shape[:3])}"
            )
        sinks = sinks.float().contiguous()
    tokens = [s.num_tokens for s in segments]
    return ext.fused_attention(
        query, tensors, meta, tokens, attention_mask, float(scaling), causal, fp8_tables(), sinks
    )


def key_dot() -> str:
    """The key dot product the fast reader uses: ``"vnni"`` (int8 queries, AVX-512 VNNI), ``"avx2"``
    (int8 queries, AVX2) or ``"float"`` (float32 algebra on the codes); initially the best this CPU
    and build run. ValueError when the kernels are not available."""
    return KEY_DOTS[_ext().key_dot()]


def key_dots_available() -> tuple[str, ...]:
    """The key dot products this build and CPU can run (``"float"`` always)."""
    ext = _ext()
    return tuple(name for i, name in enumerate(KEY_DOTS) if ext.key_dot_available(i))


def set_key_dot(name: str) -> str:
    """Use key dot product ``name`` (see `key_dot`) in later kernel calls of this process; returns
    the previous one. ValueError naming the allowed ones when this CPU or build cannot run it."""
    allowed = key_dots_available()
    if name not in allowed:
        raise ValueError(f"key dot: {name!r} is not available here; allowed: {list(allowed)}")
    return KEY_DOTS[_ext().set_key_dot(KEY_DOTS.index(name))]


@contextmanager
def using_key_dot(name: str):
    """Context manager: `set_key_dot` for the block, then the previous choice back."""
    previous = set_key_dot(name)
    try:
        yield
    finally:
        set_key_dot(previous)


def _ext():
    ext = cpu_extension()
    if ext is None:
        raise ValueError("kernel: the native CPU kernels are not available (see the build warning)")
    return ext


def dequantize_into(part: PackedTensor | PagedPart, out: torch.Tensor) -> torch.Tensor:
    """Write ``part`` (batch, heads, tokens, head_dim) dequantized into ``out`` (same shape, float
    dtype, contiguous rows) with the native kernel; a `PagedPart` is read through its block table
    into ``out`` (batch, heads, num_tokens, head_dim). Returns ``out``."""
    ext = cpu_extension()
    if ext is None:
        raise ValueError("kernel: the native CPU kernels are not available (see the build warning)")
    if out.dtype not in FLOAT_DTYPES or out.stride(-1) != 1 or out.device.type != "cpu":
        raise ValueError(
            f"out: {out.dtype} on {out.device}; allowed: float32/float16/bfloat16 on cpu, rows contiguous"
        )
    tensors: list[torch.Tensor] = []
    meta = source_meta(part, tensors)
    ext.dequantize_into(tensors, meta, part.num_tokens, out, fp8_tables())
    return out
