"""How a native kernel sees storage: one row of integers per K or V source plus a tensor list.

Row fields (``META_FIELDS``, mirrored in ``csrc/decode.h``): kind (0 exact values, 1 integer
codes, 2 codes read through a 256-entry table, i.e. FP8), bits, axis (0 per-token, 1 per-channel),
group size, mid (code offset of symmetric integer codes), indices of the codes (or values), scale
and zero tensors in the list (-1: absent), the table row (0 e4m3, 1 e5m2), then the paging fields:
index of the int32 block table (-1: not paged), tokens per block, blocks per slab, slab count and
tensors per slab in the list.

A `PagedPart` appends every slab's tensors in slab order, then its table: the data, scale and zero
indices name slab 0's tensors, slab ``j``'s are at ``index + j * slab_stride``. The kernels read
token ``t`` of batch row ``b`` in block ``table[b, t // block]`` (see `quant.paged`).

The kernels check (TORCH_CHECK) that every tensor is 4-D with contiguous rows, and the shapes,
table and block ids of paged sources.
"""

from __future__ import annotations

import functools

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from ..quant.primitives import FP8_DTYPES
from ..quant.spec import Axis, Format, QuantSpec

META_FIELDS = (
    "kind", "bits", "axis", "group", "mid", "data", "scale", "zero", "lut",
    "table", "block", "per_slab", "slabs", "slab_stride",
)  # fmt: skip
NOT_PAGED = [-1, 0, 1, 1, 0]  # table, block, per_slab, slabs, slab_stride
EXACT, INT, LUT = 0, 1, 2
LUT_ROWS = (Format.FP8_E4M3, Format.FP8_E5M2)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def fp8_tables() -> torch.Tensor:
    """float32 (2, 256): the value of every FP8 byte, e4m3 then e5m2."""
    codes = torch.arange(256, dtype=torch.uint8)
    return torch.stack([codes.view(FP8_DTYPES[f]).float() for f in LUT_ROWS])


_FIELDS: dict[int, tuple[QuantSpec, tuple[int, int, int, int, int, int]]] = {}


def _spec_fields(spec: QuantSpec) -> tuple[int, int, int, int, int, int]:
    """(kind, bits, axis, group, mid, lut) of a spec (memo by identity: hashing the frozen dataclass
    costs more than the rest of a decode step's metadata)."""
    held = _FIELDS.get(id(spec))
    if held is not None and held[0] is spec:
        return held[1]
    fields = _compute_fields(spec)
    _FIELDS[id(spec)] = (spec, fields)
    return fields


def _compute_fields(spec: QuantSpec) -> tuple[int, int, int, int, int, int]:
    kind = LUT if spec.is_fp8 else INT
    mid = 2 ** (spec.bits - 1) if spec.symmetric and not spec.is_fp8 else 0
    axis = 1 if spec.axis is Axis.CHANNEL else 0
    lut = LUT_ROWS.index(spec.format) if spec.is_fp8 else 0
    return kind, spec.bits, axis, spec.group_size, mid, lut


def source_meta(part: PackedTensor | ExactTensor | PagedPart, tensors: list[torch.Tensor]) -> list[int]:
    """The meta row of ``part``; its tensors are appended to ``tensors``."""
    if isinstance(part, PagedPart):
        return _paged_meta(part, tensors)
    n = len(tensors)
    if isinstance(part, ExactTensor):
        tensors.append(part.values)
        return exact_row(n)
    kind, bits, axis, group, mid, lut = _spec_fields(part.spec)
    tensors.append(part.codes)
    tensors.append(part.scale)
    if part.zero is None:
        return [kind, bits, axis, group, mid, n, n + 1, -1, lut, *NOT_PAGED]
    tensors.append(part.zero)
    return [kind, bits, axis, group, mid, n, n + 1, n + 2, lut, *NOT_PAGED]


def exact_row(index: int) -> list[int]:
    """The meta row of exact values at ``index`` of the tensor list (not paged)."""
    return [EXACT, 0, 0, 1, 0, index, -1, -1, 0, *NOT_PAGED]


_INDEX_FIELDS = tuple(META_FIELDS.index(f) for f in ("data", "scale", "zero", "table"))


def shift_row(row: list[int], base: int) -> list[int]:
    """``row`` for its tensors placed ``base`` entries later in the tensor list (absent ones stay -1)."""
    if not base:
        return row
    shifted = list(row)
    for field in _INDEX_FIELDS:
        if shifted[field] >= 0:
            shifted[field] += base
    return shifted


def _paged_meta(part: PagedPart, tensors: list[torch.Tensor]) -> list[int]:
    """Every slab's tensors (same format, so the same row but for indices), then the table. The
    slabs of a pool share one format (`readable` checks it; the kernels check every shape)."""
    if not part.slabs:
        raise ValueError("paged part: no slabs")
    first = len(tensors)
    row = source_meta(part.slabs[0], tensors)
    stride = len(tensors) - first
    first_slab = part.slabs[0]
    spec = getattr(first_slab, "spec", None)
    for j, slab in enumerate(part.slabs[1:], 1):
        held = slab.tensors()  # source_meta's order: values, or codes, scale (, zero)
        other = getattr(slab, "spec", None)
        if type(slab) is not type(first_slab) or len(held) != stride or (other is not spec and other != spec):
            raise ValueError(f"paged part: slab {j} has another format than slab 0; all slabs must share one")
        tensors += held
    tensors.append(part.table)
    return [*row[:9], len(tensors) - 1, part.block_size, part.per_slab, len(part.slabs), stride]


def readable(part: PackedTensor | ExactTensor | PagedPart) -> bool:
    """Whether the CPU kernels can read ``part`` in place: cpu tensors with contiguous rows (and a
    float dtype for exact values), integer or FP8 codes without an outlier side store (codebook
    and outlier formats are read by ``PackedTensor.dequantize`` only). A `PagedPart`: every slab
    readable, of one format and with the same strides as slab 0 (but along blocks), and an int32
    cpu table (batch, blocks) with contiguous rows."""
    if isinstance(part, PagedPart):
        table = part.table
        if table.dim() != 2 or table.dtype != torch.int32 or table.device.type != "cpu":
            return False
        if table.stride(-1) != 1 or not part.slabs or not all(readable(s) for s in part.slabs):
            return False
        first = part.slabs[0]

        def layout(slab: PackedTensor | ExactTensor) -> list:
            return [type(slab), getattr(slab, "spec", None)] + [
                (t.dtype, t.shape[1:], t.stride()[1:]) for t in slab.tensors()
            ]

        return all(layout(s) == layout(first) for s in part.slabs)
    if isinstance(part, ExactTensor) and part.values.dtype not in FLOAT_DTYPES:
        return False
    if isinstance(part, PackedTensor) and not part.spec.is_plain:
        return False
    return all(t.dim() == 4 and t.stride(-1) == 1 and t.device.type == "cpu" for t in part.tensors())
