"""How a native kernel sees storage: one row of integers per K or V source plus a tensor list.

Row fields (``META_FIELDS``, mirrored in ``csrc/decode.h``): kind (0 exact values, 1 integer
codes, 2 codes read through a 256-entry table, i.e. FP8, 3 codebook codes), bits, axis (0
per-token, 1 per-channel), group size, mid (code offset of symmetric integer codes), indices of the
codes (or values), scale and zero tensors in the list (-1: absent), the table (FP8: row 0 e4m3, 1
e5m2; codebooks: index of the float32 levels tensor in the list), then the paging fields: index of
the int32 block table (-1: not paged), tokens per block, blocks per slab, slab count and tensors per
slab in the list; then the outlier side store (indices of the int16 positions and of the values,
tokens per outlier block); then the page transform a reader must undo (`storage.transform`):
index of the rotation ``Q`` (D, D), of the RoPE table (`rope_table`), of the int32 positions
(batch, kv_heads, tokens, 1) (-1: none), and the cache position of token 0 when positions are
contiguous.

A `PagedPart` appends every slab's tensors in slab order, then its table: the data, scale, zero and
outlier indices name slab 0's tensors, slab ``j``'s are at ``index + j * slab_stride``. The kernels
read token ``t`` of batch row ``b`` in block ``table[b, t // block]`` (see `quant.paged`).

The kernels check (TORCH_CHECK) that every tensor is 4-D with contiguous rows, and the shapes,
table, block ids and positions of paged and transformed sources.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from ..quant.exact import ExactTensor
from ..quant.packed import PackedTensor
from ..quant.paged import PagedPart
from ..quant.primitives import FP8_DTYPES, codebook_levels
from ..quant.rope import Rope
from ..quant.spec import Axis, Format, QuantSpec

if TYPE_CHECKING:  # storage imports the kernels (page dequantization)
    from ..storage.transform import PartTransform

META_FIELDS = (
    "kind", "bits", "axis", "group", "mid", "data", "scale", "zero", "lut",
    "table", "block", "per_slab", "slabs", "slab_stride",
    "oidx", "oval", "otokens", "rot", "rope", "pos", "pos_offset",
)  # fmt: skip
NOT_PAGED = [-1, 0, 1, 1, 0]  # table, block, per_slab, slabs, slab_stride
NO_OUTLIERS = [-1, -1, 1]  # oidx, oval, otokens
NO_TRANSFORM = [-1, -1, -1, 0]  # rot, rope, pos, pos_offset
EXACT, INT, LUT, CODEBOOK = 0, 1, 2, 3
LUT_ROWS = (Format.FP8_E4M3, Format.FP8_E5M2)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_ROPE_POSITIONS = 4096  # RoPE tables grow in powers of two from here


@functools.cache
def fp8_tables() -> torch.Tensor:
    """float32 (2, 256): the value of every FP8 byte, e4m3 then e5m2."""
    codes = torch.arange(256, dtype=torch.uint8)
    return torch.stack([codes.view(FP8_DTYPES[f]).float() for f in LUT_ROWS])


_ROPE_TABLES: dict[bytes, torch.Tensor] = {}


def rope_table(rope: Rope, num_positions: int) -> torch.Tensor:
    """float32 (P, head_dim), P >= ``num_positions``: row ``p`` is ``[cos(p w) | sin(p w)]`` over the
    ``head_dim / 2`` frequencies ``w`` of ``rope``, computed as `Rope.cos_sin` computes them (the
    reference path's RoPE, bit for bit). One table per frequency vector, shared by every cache and
    layer, grown in powers of two (at least `MIN_ROPE_POSITIONS`): its size is set by the longest
    context read, ``P x head_dim x 4`` bytes (2 MiB at 8k positions of head_dim 64)."""
    key = rope.inv_freq.detach().cpu().float().numpy().tobytes()
    held = _ROPE_TABLES.get(key)
    if held is not None and held.shape[0] >= num_positions:
        return held
    size = MIN_ROPE_POSITIONS
    while size < num_positions:
        size *= 2
    cos, sin = rope.cos_sin(0, size, torch.device("cpu"))
    half = cos.shape[-1] // 2
    table = torch.cat([cos[:, :half], sin[:, :half]], dim=1).contiguous()
    _ROPE_TABLES[key] = table
    return table


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
    kind = LUT if spec.is_fp8 else CODEBOOK if spec.is_codebook else INT
    mid = 2 ** (spec.bits - 1) if spec.symmetric and kind == INT else 0
    axis = 1 if spec.axis is Axis.CHANNEL else 0
    lut = LUT_ROWS.index(spec.format) if spec.is_fp8 else -1
    return kind, spec.bits, axis, spec.group_size, mid, lut


def _levels(spec: QuantSpec) -> torch.Tensor:
    """float32 (2**bits,) codebook levels on the CPU (cached per codebook)."""
    return codebook_levels(spec, torch.device("cpu"))


def source_meta(
    part: PackedTensor | ExactTensor | PagedPart,
    tensors: list[torch.Tensor],
    transform: PartTransform | None = None,
) -> list[int]:
    """The meta row of ``part``; its tensors (and the codebook levels, block table and transform
    constants it needs) are appended to ``tensors``. ``transform``: the page transform the stored
    tokens went through, undone by the fused attention (None: stored as computed)."""
    if isinstance(part, PagedPart):
        row = _paged_meta(part, tensors)
    else:
        row = _own_meta(part, tensors) + NOT_PAGED + _outlier_fields(part, len(tensors) - len(part.tensors()))
    if row[0] == CODEBOOK:
        tensors.append(_levels(part.spec))
        row[8] = len(tensors) - 1
    return row + _transform_fields(transform, part, tensors)


def _own_meta(part: PackedTensor | ExactTensor, tensors: list[torch.Tensor]) -> list[int]:
    """The first nine fields of a page or exact tensor; appends its tensors (`tensors()` order)."""
    n = len(tensors)
    tensors += part.tensors()
    if isinstance(part, ExactTensor):
        return [EXACT, 0, 0, 1, 0, n, -1, -1, 0]
    kind, bits, axis, group, mid, lut = _spec_fields(part.spec)
    zero = n + 2 if part.zero is not None else -1
    return [kind, bits, axis, group, mid, n, n + 1, zero, lut]


def _outlier_fields(part: PackedTensor | ExactTensor, first: int) -> list[int]:
    """(oidx, oval, otokens) of a page whose tensors start at index ``first``."""
    if not isinstance(part, PackedTensor) or part.outlier_index is None:
        return list(NO_OUTLIERS)
    index = first + 2 + (part.zero is not None)  # codes, scale (, zero), outlier index, outlier value
    return [index, index + 1, part.spec.outlier_tokens]


def exact_row(index: int) -> list[int]:
    """The meta row of exact values at ``index`` of the tensor list (not paged, untransformed)."""
    return [EXACT, 0, 0, 1, 0, index, -1, -1, 0, *NOT_PAGED, *NO_OUTLIERS, *NO_TRANSFORM]


_INDEX_FIELDS = tuple(
    META_FIELDS.index(f) for f in ("data", "scale", "zero", "table", "oidx", "oval", "rot", "rope", "pos")
)
_KIND, _LUT = META_FIELDS.index("kind"), META_FIELDS.index("lut")


def shift_row(row: list[int], base: int) -> list[int]:
    """``row`` for its tensors placed ``base`` entries later in the tensor list (absent ones stay -1;
    a codebook's ``lut`` field is the index of its levels tensor, an FP8 one a table row)."""
    if not base:
        return row
    shifted = list(row)
    for field in _INDEX_FIELDS:
        if shifted[field] >= 0:
            shifted[field] += base
    if shifted[_KIND] == CODEBOOK:
        shifted[_LUT] += base
    return shifted


def _paged_meta(part: PagedPart, tensors: list[torch.Tensor]) -> list[int]:
    """Every slab's tensors (same format, so the same row but for indices), then the table. The
    slabs of a pool share one format (`readable` checks it; the kernels check every shape)."""
    if not part.slabs:
        raise ValueError("paged part: no slabs")
    first = len(tensors)
    first_slab = part.slabs[0]
    row = _own_meta(first_slab, tensors)
    outliers = _outlier_fields(first_slab, first)
    stride = len(tensors) - first
    spec = getattr(first_slab, "spec", None)
    for j, slab in enumerate(part.slabs[1:], 1):
        held = slab.tensors()  # `_own_meta`'s order: values, or codes, scale (, zero) (, outliers)
        other = getattr(slab, "spec", None)
        if type(slab) is not type(first_slab) or len(held) != stride or (other is not spec and other != spec):
            raise ValueError(f"paged part: slab {j} has another format than slab 0; all slabs must share one")
        tensors += held
    tensors.append(part.table)
    return [*row, len(tensors) - 1, part.block_size, part.per_slab, len(part.slabs), stride, *outliers]


def _transform_fields(
    transform: PartTransform | None, part: PackedTensor | ExactTensor | PagedPart, tensors: list[torch.Tensor]
) -> list[int]:
    """(rot, rope, pos, pos_offset) of ``transform``; appends its constants (and positions)."""
    if transform is None or isinstance(part, ExactTensor):
        return list(NO_TRANSFORM)
    rot = rope = pos = -1
    offset = 0
    if transform.rotation is not None:
        tensors.append(transform.rotation.float().contiguous())
        rot = len(tensors) - 1
    if transform.rope is not None:
        if isinstance(transform.start, int):
            offset = transform.first_position
            needed = offset + part.num_tokens
        else:
            positions = transform.start[:, :, : part.num_tokens].to(torch.int32).unsqueeze(-1)
            tensors.append(positions)
            pos = len(tensors) - 1
            needed = int(positions.max()) + 1 if positions.numel() else 0
        tensors.append(rope_table(transform.rope, needed))
        rope = len(tensors) - 1
    return [rot, rope, pos, offset]


def readable(part: PackedTensor | ExactTensor | PagedPart) -> bool:
    """Whether the CPU kernels can read ``part`` in place: cpu tensors with contiguous rows (and a
    float dtype for exact values); any packed format (integer, FP8, codebook, with or without an
    outlier side store). A `PagedPart`: every slab readable, of one format and with the same strides
    as slab 0 (but along blocks), and an int32 cpu table (batch, blocks) with contiguous rows."""
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
    return all(t.dim() == 4 and t.stride(-1) == 1 and t.device.type == "cpu" for t in part.tensors())
