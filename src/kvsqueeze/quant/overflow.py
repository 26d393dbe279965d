"""Metadata range: scales, zero points and outlier values must be finite in their dtype.

The default metadata dtype, float16, holds magnitudes up to 65504. Keys and values of bf16 and
fp32 models can leave that range (a ``k_proj`` bias of -70000 on one channel, as outlier channels
of real models have): the zero point of such a group (its minimum), its scale (the group's
absolute maximum for symmetric 2-bit codes) or an outlier kept aside rounds to ±inf, and the
whole group dequantizes to NaN. Clamping instead would move a zero point by thousands and
destroy the group, so:

* `PackedTensor.from_float` never stores non-finite metadata for finite input: when the metadata
  it chose overflows, it quantizes again with `widened(spec)` (float32 scales, zero points and
  outlier values, which hold any float32 input range);
* a `PagedStore` then keeps float32 metadata for all its pages (existing pages are converted
  exactly), warns once (`MetadataOverflowWarning`) and reports the bytes it really holds.

For a risk check: `metadata_overflows` says whether a given tensor overflows a spec's metadata,
`safe_magnitude` below which input magnitude no group of a spec can.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .outliers import split_outliers
from .primitives import FP8_DTYPES, choose_qparams
from .spec import QuantSpec

WIDE_SCALE_DTYPE = "float32"
_FLOAT32_MAX = torch.finfo(torch.float32).max


class MetadataOverflowWarning(UserWarning):
    """K/V left the range of a store's metadata dtype; it switched to float32 metadata."""


def widened(spec: QuantSpec) -> QuantSpec:
    """``spec`` with float32 metadata (scales, zero points, outlier values); same codes."""
    return spec if spec.scale_dtype == WIDE_SCALE_DTYPE else replace(spec, scale_dtype=WIDE_SCALE_DTYPE)


def metadata_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every element of the given tensors (None: skipped) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def metadata_amax(*tensors: torch.Tensor | None) -> float:
    """The largest magnitude among the given tensors (None: skipped), as a Python float."""
    held = [t.float().abs().amax() for t in tensors if t is not None and t.numel()]
    return float(torch.stack(held).amax()) if held else 0.0


def metadata_overflows(x: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether quantizing ``x`` (batch, kv_heads, tokens, head_dim; whole per-channel groups and
    outlier blocks) with ``spec`` gives a scale, zero point or outlier value that is not finite in
    its dtype (``spec.scale_dtype``, ``spec.outlier_value_dtype``), i.e. whether a store of this
    spec has to widen its metadata for ``x``."""
    x = x.float()
    if spec.has_outliers:
        x, _, value = split_outliers(x, spec, spec.outlier_count(x.shape[-1]))
        if not metadata_finite(value.to(spec.outlier_value_dtype)):
            return True
    scale, zero = choose_qparams(x, spec)
    return not metadata_finite(scale, zero)


def safe_magnitude(spec: QuantSpec) -> float:
    """The largest ``|x|`` for which no group of ``spec`` can overflow its metadata dtype: K/V whose
    elements all stay within it keep finite scales, zero points and outlier values.

    Asymmetric and codebook groups store their minimum or mid-range (bound: the dtype's largest
    finite value), symmetric integer groups ``amax / (2**(bits-1) - 1)`` and FP8 groups
    ``amax / fp8_max``; outlier values are stored as they are.
    """
    limit = torch.finfo(spec.torch_scale_dtype).max
    if spec.is_fp8:
        limit *= torch.finfo(FP8_DTYPES[spec.format]).max
    elif spec.symmetric and not spec.is_codebook:
        limit *= max(2 ** (spec.bits - 1) - 1, 1)
    if spec.has_outliers:
        limit = min(limit, torch.finfo(spec.outlier_value_dtype).max)
    return float(min(limit, _FLOAT32_MAX / 2))  # group ranges (max - min) are computed in float32
