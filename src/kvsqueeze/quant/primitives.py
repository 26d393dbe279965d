"""The quantizer core: `choose_qparams`, `quantize`, `dequantize` (pure functions).

Tensors have the transformers layout ``(batch, kv_heads, tokens, head_dim)``. Scales and zero
points have shape ``(batch, kv_heads, tokens, head_dim / group_size)`` for per-token groups
and ``(batch, kv_heads, tokens / group_size, head_dim)`` for per-channel groups.

Integer codes are unsigned ``uint8`` in ``[0, 2**bits)``: asymmetric ``x ~ code * scale + zero``
(``zero`` is the group minimum, KIVI style), symmetric ``x ~ (code - mid) * scale``. FP8 codes
are the raw bytes of ``x / scale`` in the FP8 format (``scale = amax / max_finite``). Codebook
(``"nf"``) codes are indices of the nearest level of ``(x - zero) / scale`` with ``zero`` the
group's mid-range and ``scale`` its half-range (symmetric: ``zero = 0``, ``scale = amax``), so
the group's extremes map to -1 and 1; dequantization is ``x = level[code] * scale + zero``.
"""

from __future__ import annotations

import functools

import torch

from .codebook import encode
from .spec import Axis, Format, QuantSpec

FP8_DTYPES = {Format.FP8_E4M3: torch.float8_e4m3fn, Format.FP8_E5M2: torch.float8_e5m2}
_TINY = 1e-6


def grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` (B, H, T, D) with one group per slice along the last axis of the result.

    Per-token: (B, H, T, D/g, g). Per-channel: (B, H, T/g, D, g) (a transposed view).
    """
    if spec.axis is Axis.TOKEN:
        return x.unflatten(-1, (-1, spec.group_size))
    return x.unflatten(-2, (-1, spec.group_size)).transpose(-1, -2)


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) for ``x`` (B, H, T, D), already rounded to
    ``spec.scale_dtype`` so that codes are computed against exactly what is stored.

    The scale is rounded up and the zero point down (never to nearest), so every element of a
    group lies inside the stored code range and no code saturates: the error stays within half
    a stored scale even where the scale dtype is coarse (e.g. fp16 subnormal scales)."""
    g = grouped(x.float(), spec)
    dtype = spec.torch_scale_dtype
    if spec.is_fp8:
        fmax = torch.finfo(FP8_DTYPES[spec.format]).max
        scale = g.abs().amax(-1) / fmax
        return _round_directed(scale.clamp_min(_TINY), dtype, up=True), None
    if spec.is_codebook:
        return _codebook_qparams(g, spec)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1) - 1
        scale = g.abs().amax(-1) / max(half, 1)
        return _round_directed(scale.clamp_min(_TINY), dtype, up=True), None
    lo, hi = g.amin(-1), g.amax(-1)
    zero = _round_directed(lo, dtype, up=False)
    scale = _round_directed(((hi - zero.float()) / (2**spec.bits - 1)).clamp_min(_TINY), dtype, up=True)
    return scale, zero


def _codebook_qparams(g: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = spec.torch_scale_dtype
    if spec.symmetric:
        return _round_directed(g.abs().amax(-1).clamp_min(_TINY), dtype, up=True), None
    lo, hi = g.amin(-1), g.amax(-1)
    zero = ((hi + lo) / 2).to(dtype)
    half = torch.maximum(hi - zero.float(), zero.float() - lo)
    return _round_directed(half.clamp_min(_TINY), dtype, up=True), zero


@functools.cache
def _levels_cpu(levels: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32)


def codebook_levels(spec: QuantSpec, device: torch.device) -> torch.Tensor:
    """float32 (2**bits,) levels of an ``"nf"`` spec, on ``device``."""
    return _levels_cpu(spec.levels).to(device)


def _round_directed(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (float32) converted to ``dtype``, rounded toward +inf (``up``) or -inf.

    Values beyond the dtype's finite range become ±inf, never its largest finite value (which
    rounding 1e6 down would give): metadata out of range must show, see `overflow`."""
    y = x.to(dtype)
    if y.element_size() != 2:  # float32: nothing was rounded
        return y
    wrong = y.float() < x if up else y.float() > x
    bits = y.view(torch.int16)
    # One step along the float line: +1 on the bit pattern grows |y|, -1 shrinks it; the sign
    # bit (negative int16) tells which of the two moves toward +inf.
    step = torch.where(bits >= 0, 1, -1).to(torch.int16)
    y = torch.where(wrong, bits + (step if up else -step), bits).view(dtype)
    beyond = x.abs() > torch.finfo(dtype).max
    return torch.where(beyond, x.sign().to(dtype) * float("inf"), y)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Codes (uint8, same shape as ``x`` (B, H, T, D)); for FP8 the raw FP8 bytes."""
    g = grouped(x.float(), spec)
    s = scale.float().unsqueeze(-1)
    if spec.is_fp8:
        q = (g / s).to(FP8_DTYPES[spec.format]).view(torch.uint8)
    elif spec.is_codebook:
        centered = g if zero is None else g - zero.float().unsqueeze(-1)
        q = encode(centered / s, codebook_levels(spec, x.device))
    elif spec.symmetric:
        mid = 2 ** (spec.bits - 1)
        q = (torch.round(g / s) + mid).clamp_(1 if spec.bits > 1 else 0, 2**spec.bits - 1).to(torch.uint8)
    else:
        q = torch.round((g - zero.float().unsqueeze(-1)) / s).clamp_(0, 2**spec.bits - 1).to(torch.uint8)
    return _ungroup(q, spec)


def _ungroup(g: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.axis is Axis.TOKEN:
        return g.flatten(-2)
    return g.transpose(-1, -2).flatten(-3, -2)


def offset(
    scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, dtype: torch.dtype
) -> torch.Tensor:
    """The additive term of ``x = code * scale + offset`` (same shape as ``scale``); for codebook
    specs ``code`` is the code's level."""
    if spec.is_fp8 or (spec.is_codebook and spec.symmetric):
        return torch.zeros((), dtype=dtype, device=scale.device)
    if spec.symmetric:
        return scale.to(dtype) * -(2 ** (spec.bits - 1))
    return zero.to(dtype)


def apply_qparams_(
    codes_as_float: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """In place: turn decoded codes (B, H, T, D) in a float tensor into dequantized values (for
    codebook specs the codes must already be replaced by their levels, see `decode_codes`).

    Symmetric integer codes into a 16-bit tensor are computed as ``(code - mid) * scale``: the
    offset ``-mid * scale`` alone can overflow float16 (2-bit codes of a group reaching 32768)
    while every value fits. The result is the same bits as ``code * scale + offset`` (an exact
    sum in float32, rounded once) whenever that one is finite."""
    g = grouped(codes_as_float, spec)
    s = scale.to(codes_as_float.dtype).unsqueeze(-1)
    if spec.is_fp8 or (spec.is_codebook and spec.symmetric):
        g.mul_(s)
        return codes_as_float
    if spec.symmetric and not spec.is_codebook and codes_as_float.element_size() < 4:
        g.sub_(2 ** (spec.bits - 1)).mul_(s)
        return codes_as_float
    o = offset(scale, zero, spec, codes_as_float.dtype)
    o = o.unsqueeze(-1) if o.dim() else o
    torch.addcmul(o, g, s, out=g)
    return codes_as_float


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values (B, H, T, D) from unpacked codes; written into ``out`` when given."""
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    decode_codes(codes, spec, out)
    return apply_qparams_(out, scale, zero, spec)


def decode_codes(codes: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> torch.Tensor:
    """Write unpacked ``codes`` (uint8, B, H, T, D) into ``out`` as numbers: the FP8 value, the
    codebook level, or the integer code; returns ``out``."""
    if spec.is_fp8:
        return out.copy_(codes.view(FP8_DTYPES[spec.format]))
    if spec.is_codebook:
        return out.copy_(codebook_levels(spec, codes.device)[codes.long()])
    return out.copy_(codes)
