"""Fused attention for CUDA with Triton: the same signature as `kernels.cpu.fused_attention`.

Kept small on purpose. One Triton program per (batch, query head, query token) walks one packed
page — integer keys grouped per channel, integer values grouped per token (2, 4 or 8 bits, the
KIVI layout of every integer preset) — in tiles of ``BLOCK_T`` tokens, unpacking the planar codes
in registers, and returns its output and log-sum-exp. Exact segments (sinks, window, new tokens)
and any other page format (FP8, 3-bit, codebooks, outliers, other grouping axes) or transformed page
(rotations, pre-RoPE keys: every ``best-*`` preset) are computed in torch on the dequantized page,
its transform undone as the reference path does (issue 16: the CPU kernel reads them in place; the
Triton program does not yet). All partial results are merged by log-sum-exp in torch.

Paged segments (`PagedPart`, read through block tables by the CPU kernels) are first copied into
contiguous storage with ``PagedPart.gather``: a fallback, costing one copy of the segment per call,
until the Triton program reads the tables itself.

Honest limits: each query head re-reads its KV head's codes (GQA groups are not shared within a
program; the GPU's L2 absorbs most of it), the merge is in torch, and it is tested only through
``TRITON_INTERPRET=1`` on CPU tensors, not benchmarked on a GPU.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from ..quant.spec import Axis

BLOCK_T = 16


def available() -> bool:
    """Whether triton is installed (and a CUDA device present, outside the interpreter)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _kernel_reads(part: PackedTensor | ExactTensor, is_key: bool) -> bool:
    """Whether the Triton program reads ``part``: plain integer codes (no codebook, no outliers) of
    2, 4 or 8 bits, grouped per channel (keys) or per token (values)."""
    if not isinstance(part, PackedTensor) or not part.spec.is_plain or part.spec.is_fp8:
        return False
    if part.spec.bits not in (2, 4, 8):
        return False
    return part.spec.axis is (Axis.CHANNEL if is_key else Axis.TOKEN)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor | None) -> torch.Tensor:
    """Merge (output (B, Hq, Lq, D), lse (B, Hq, Lq)) pairs by log-sum-exp; ``sinks`` (B, Hq, Lq)
    join the denominator as parts whose output is zero."""
    lse = torch.stack([p[1] for p in parts])
    total = torch.logsumexp(lse if sinks is None else torch.cat([lse, sinks.float()[None]]), dim=0)
    weights = torch.exp(lse - total).nan_to_num(0.0)  # a row no part sees gives 0
    return sum(w.unsqueeze(-1) * p[0] for w, p in zip(weights, parts, strict=True))


def _torch_part(q, k, v, bias, scaling):
    """Partial attention on dense k, v (B, Hkv, n, D); bias (B|1, Hq|1, Lq, n) additive or None."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    s = (q.float() @ k.transpose(-1, -2)) * scaling
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v, lse


def _triton_part(q, key, value, n, bias, scaling):
    from ._triton_page import packed_page_attention

    return packed_page_attention(q, key, value, n, bias, scaling, BLOCK_T)


def fused_attention(
    query: torch.Tensor,
    segments: Sequence,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, head_dim) over ``segments``, with optional
    ``sinks`` (batch, q_heads, q_len) (see `kernels.cpu.fused_attention`); returns (batch, q_len,
    q_heads, head_dim)."""
    b, hq, lq, d = query.shape
    total = sum(s.num_tokens for s in segments)
    if attention_mask is None:
        bias = None
        if causal and lq > 1:
            visible = torch.arange(total, device=query.device)[None, :] <= (
                torch.arange(lq, device=query.device)[:, None] + total - lq
            )
            bias = torch.zeros(1, 1, lq, total, device=query.device).masked_fill(~visible, -math.inf)
    elif attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, device=query.device).masked_fill(~attention_mask, -math.inf)
    else:
        bias = attention_mask.float()
    parts, pos = [], 0
    for seg in segments:
        n = seg.num_tokens
        seg_bias = None if bias is None else bias[..., pos : pos + n]
        # Fallback until the kernel reads block tables: paged parts as one contiguous copy.
        key, value = (p.gather() if isinstance(p, PagedPart) else p for p in (seg.key, seg.value))
        transforms = (getattr(seg, "key_transform", None), getattr(seg, "value_transform", None))
        if transforms == (None, None) and _kernel_reads(key, True) and _kernel_reads(value, False):
            parts.append(_triton_part(query, key, value, n, seg_bias, scaling))
        else:  # other formats and transformed parts: dequantized, transform undone (as the reference)
            k, v = (p.slice_tokens(0, n).dequantize(dtype=torch.float32) for p in (key, value))
            for x, transform in zip((k, v), transforms, strict=True):
                if transform is not None:
                    transform.restore_(x)
            parts.append(_torch_part(query, k, v, seg_bias, scaling))
        pos += n
    return _merge(parts, sinks).to(query.dtype).transpose(1, 2).contiguous()
