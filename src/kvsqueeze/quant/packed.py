"""`PackedTensor`: bit-packed codes plus their scales and zero points, with its own size.

Shapes, for ``tokens`` tokens of a (batch, kv_heads, tokens, head_dim) tensor:

* ``codes``: uint8 (batch, kv_heads, tokens, head_dim * bits / 8), see `packing`;
* ``scale`` and ``zero``: ``spec.scale_dtype``, (batch, kv_heads, tokens, head_dim / group_size)
  per-token or (batch, kv_heads, tokens / group_size, head_dim) per-channel; ``zero`` is None
  for symmetric and FP8 specs;
* ``outlier_index`` (int16) and ``outlier_value`` (``spec.outlier_value_dtype``): (batch, kv_heads,
  tokens / outlier_tokens, count), the dense-and-sparse side store (`outliers`), None without
  outliers.

Scales, zero points and outlier values are always finite for finite input: `from_float` widens
the metadata to float32 when the spec's dtype cannot hold them (`overflow`).

A fused attention path reads these three tensors directly; the reference path calls
`dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .outliers import INDEX_DTYPE, restore_, split_outliers
from .overflow import WIDE_SCALE_DTYPE, metadata_finite, widened
from .packing import pack, packed_size, unpack
from .primitives import FP8_DTYPES, apply_qparams_, choose_qparams, decode_codes, quantize
from .spec import Axis, QuantSpec


@dataclass
class PackedTensor:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    outlier_index: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    @staticmethod
    def empty(
        batch_size: int, num_heads: int, num_tokens: int, head_dim: int, spec: QuantSpec, device: torch.device
    ) -> PackedTensor:
        """Uninitialised storage for ``num_tokens`` tokens (a whole number of per-channel groups)."""
        rows, cols = scale_shape(num_tokens, head_dim, spec)
        codes = torch.empty(
            batch_size,
            num_heads,
            num_tokens,
            packed_size(head_dim, spec.bits),
            dtype=torch.uint8,
            device=device,
        )
        meta = (batch_size, num_heads, rows, cols)
        scale = torch.empty(meta, dtype=spec.torch_scale_dtype, device=device)
        zero = torch.empty(meta, dtype=spec.torch_scale_dtype, device=device) if spec.has_zero else None
        if not spec.has_outliers:
            return PackedTensor(codes, scale, zero, spec)
        side = (batch_size, num_heads, num_tokens // spec.outlier_tokens, spec.outlier_count(head_dim))
        index = torch.empty(side, dtype=INDEX_DTYPE, device=device)
        return PackedTensor(
            codes, scale, zero, spec, index, torch.empty(side, dtype=spec.outlier_value_dtype, device=device)
        )

    @staticmethod
    def from_float(x: torch.Tensor, spec: QuantSpec) -> PackedTensor:
        """Quantize and pack ``x`` (B, H, T, D); T must be a whole number of per-channel groups
        (and of outlier blocks when the spec keeps outliers).

        When a scale, zero point or outlier value of ``x`` does not fit ``spec.scale_dtype`` (K/V
        beyond ±65504 with float16 metadata), ``x`` is quantized with float32 metadata instead:
        the result's ``spec`` is then ``overflow.widened(spec)`` (callers that keep pages, like
        `PagedStore`, compare it with theirs)."""
        packed = PackedTensor._encode(x, spec)
        if packed.metadata_finite or spec.scale_dtype == WIDE_SCALE_DTYPE:
            return packed
        return PackedTensor._encode(x, widened(spec))

    @staticmethod
    def _encode(x: torch.Tensor, spec: QuantSpec) -> PackedTensor:
        index = value = None
        if spec.has_outliers:
            x, index, value = split_outliers(x.float(), spec, spec.outlier_count(x.shape[-1]))
            value = value.to(spec.outlier_value_dtype)
        scale, zero = choose_qparams(x, spec)
        codes = pack(quantize(x, scale, zero, spec), spec.bits)
        return PackedTensor(codes, scale, zero, spec, index, value)

    @property
    def metadata_finite(self) -> bool:
        """Whether every scale, zero point and outlier value is finite."""
        return metadata_finite(self.scale, self.zero, self.outlier_value)

    def with_metadata_of(self, spec: QuantSpec) -> PackedTensor:
        """A copy with the metadata (scales, zero points, outlier values) in the dtypes of ``spec``,
        which differs from this spec at most in ``scale_dtype``; the codes are shared. Exact when
        the new dtypes are wider (float16 / bfloat16 to float32)."""
        assert replace(spec, scale_dtype=self.spec.scale_dtype) == self.spec, (
            "only the metadata dtype may change"
        )

        def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        meta = spec.torch_scale_dtype
        return PackedTensor(
            self.codes,
            self.scale.to(meta),
            cast(self.zero, meta),
            spec,
            self.outlier_index,
            cast(self.outlier_value, spec.outlier_value_dtype),
        )

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.spec.bits

    @property
    def nbytes(self) -> int:
        """Bytes held: codes + scales + zero points + outlier side store."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        held = (self.codes, self.scale, self.zero, self.outlier_index, self.outlier_value)
        return [t for t in held if t is not None]

    def slice_tokens(self, start: int, stop: int) -> PackedTensor:
        """A view of tokens [start, stop) (per-channel: bounds on group boundaries)."""
        r0, r1 = _rows(start, self.spec), _rows(stop, self.spec)
        zero = None if self.zero is None else self.zero[:, :, r0:r1]
        index = value = None
        if self.outlier_index is not None:
            o0, o1 = _outlier_rows(start, self.spec), _outlier_rows(stop, self.spec)
            index, value = self.outlier_index[:, :, o0:o1], self.outlier_value[:, :, o0:o1]
        return PackedTensor(
            self.codes[:, :, start:stop], self.scale[:, :, r0:r1], zero, self.spec, index, value
        )

    def copy_(self, other: PackedTensor) -> None:
        """Copy ``other`` (same spec and shape) into this storage."""
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            assert dst.dtype == src.dtype, "copy_: metadata dtypes differ (widen the pages first)"
            dst.copy_(src)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedTensor:
        """Apply ``fn`` to every held tensor (e.g. batch selection), returning a new PackedTensor."""

        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return PackedTensor(
            fn(self.codes),
            fn(self.scale),
            opt(self.zero),
            self.spec,
            opt(self.outlier_index),
            opt(self.outlier_value),
        )

    def dequantize(self, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values (B, H, T, D), written into ``out`` when given (no other full-size temporary)."""
        if out is None:
            out = torch.empty(*self.codes.shape[:-1], self.head_dim, dtype=dtype, device=self.codes.device)
        if self.spec.is_fp8:
            out.copy_(self.codes.view(FP8_DTYPES[self.spec.format]))
        elif self.spec.is_codebook:
            decode_codes(unpack(self.codes, self.spec.bits), self.spec, out)
        else:
            unpack(self.codes, self.spec.bits, out=out)
        apply_qparams_(out, self.scale, self.zero, self.spec)
        if self.outlier_index is not None:
            restore_(out, self.outlier_index, self.outlier_value, self.spec.outlier_tokens)
        return out


def scale_shape(num_tokens: int, head_dim: int, spec: QuantSpec) -> tuple[int, int]:
    """(rows, cols) of the scale tensor for ``num_tokens`` tokens."""
    if spec.axis is Axis.TOKEN:
        return num_tokens, head_dim // spec.group_size
    return num_tokens // spec.group_size, head_dim


def _outlier_rows(num_tokens: int, spec: QuantSpec) -> int:
    assert num_tokens % spec.outlier_tokens == 0, "slices must fall on outlier block boundaries"
    return num_tokens // spec.outlier_tokens


def _rows(num_tokens: int, spec: QuantSpec) -> int:
    if spec.axis is Axis.TOKEN:
        return num_tokens
    assert num_tokens % spec.group_size == 0, "per-channel slices must fall on group boundaries"
    return num_tokens // spec.group_size
