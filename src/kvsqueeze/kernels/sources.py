"""How a native kernel sees storage: one row of integers per K or V source plus a tensor list.

Row fields (``META_FIELDS``, mirrored in ``csrc/decode.h``): kind (0 exact values, 1 integer
codes, 2 codes read through a 256-entry table, i.e. FP8), bits, axis (0 per-token, 1 per-channel),
group size, mid (code offset of symmetric integer codes), indices of the codes (or values), scale
and zero tensors in the list (-1: absent) and the table row (0 e4m3, 1 e5m2).

The kernels check (TORCH_CHECK) that every tensor is 4-D with contiguous rows.
"""

from __future__ import annotations

import functools

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.primitives import FP8_DTYPES
from ..quant.spec import Axis, Format, QuantSpec

META_FIELDS = ("kind", "bits", "axis", "group", "mid", "data", "scale", "zero", "lut")
EXACT, INT, LUT = 0, 1, 2
LUT_ROWS = (Format.FP8_E4M3, Format.FP8_E5M2)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def fp8_tables() -> torch.Tensor:
    """float32 (2, 256): the value of every FP8 byte, e4m3 then e5m2."""
    codes = torch.arange(256, dtype=torch.uint8)
    return torch.stack([codes.view(FP8_DTYPES[f]).float() for f in LUT_ROWS])


@functools.cache
def _spec_fields(spec: QuantSpec) -> tuple[int, int, int, int, int, int]:
    """(kind, bits, axis, group, mid, lut) of a spec."""
    kind = LUT if spec.is_fp8 else INT
    mid = 2 ** (spec.bits - 1) if spec.symmetric and not spec.is_fp8 else 0
    axis = 1 if spec.axis is Axis.CHANNEL else 0
    lut = LUT_ROWS.index(spec.format) if spec.is_fp8 else 0
    return kind, spec.bits, axis, spec.group_size, mid, lut


def source_meta(part: PackedTensor | ExactTensor, tensors: list[torch.Tensor]) -> list[int]:
    """The meta row of ``part``; its tensors are appended to ``tensors``."""
    n = len(tensors)
    if isinstance(part, ExactTensor):
        tensors.append(part.values)
        return [EXACT, 0, 0, 1, 0, n, -1, -1, 0]
    kind, bits, axis, group, mid, lut = _spec_fields(part.spec)
    tensors.append(part.codes)
    tensors.append(part.scale)
    if part.zero is None:
        return [kind, bits, axis, group, mid, n, n + 1, -1, lut]
    tensors.append(part.zero)
    return [kind, bits, axis, group, mid, n, n + 1, n + 2, lut]


def readable(part: PackedTensor | ExactTensor) -> bool:
    """Whether the CPU kernels can read ``part`` in place: cpu tensors with contiguous rows (and a
    float dtype for exact values), integer or FP8 codes without an outlier side store (codebook
    and outlier formats are read by ``PackedTensor.dequantize`` only)."""
    if isinstance(part, ExactTensor) and part.values.dtype not in FLOAT_DTYPES:
        return False
    if isinstance(part, PackedTensor) and not part.spec.is_plain:
        return False
    return all(t.dim() == 4 and t.stride(-1) == 1 and t.device.type == "cpu" for t in part.tensors())
