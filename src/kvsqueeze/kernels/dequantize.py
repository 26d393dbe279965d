"""`dequantize_into`: one page (or a `PagedPart`) into a float buffer, natively when possible (the
reference path's read).

The native CPU kernel and ``PackedTensor.dequantize`` compute the same float32 values bit for bit
(``x = code * scale + offset`` with two roundings, no fused multiply-add); tests check it.
"""

from __future__ import annotations

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from .build import cpu_extension, native_enabled
from .sources import readable


def dequantize_into(part: PackedTensor | ExactTensor | PagedPart, out: torch.Tensor) -> torch.Tensor:
    """Write ``part`` (batch, heads, tokens, head_dim) into ``out`` (same shape); returns ``out``.
    A `PagedPart` is read through its block table (``PagedPart.dequantize`` without the kernels)."""
    if (
        isinstance(part, PackedTensor | PagedPart)
        and out.device.type == "cpu"
        and native_enabled()
        and readable(part)
        and cpu_extension() is not None
    ):
        from .cpu import dequantize_into as native

        return native(part, out)
    return part.dequantize(out=out)
