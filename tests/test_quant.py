"""Tests for kvsqueeze.quant: bit packing, the quantizer primitives and `PackedTensor`.

Everything is exact and CPU-only: packing must be a bijection, the dequantization error must
stay inside the analytic bound of each format, and the packed path must reproduce the pure
functions bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kvsqueeze.quant import PackedTensor, QuantSpec, choose_qparams, dequantize, pack, quantize, unpack
from kvsqueeze.quant.packing import packed_size

B, H, T, D = 2, 3, 64, 64
GROUP = 32

# (format, bits) of every supported code.
CODES = [("int", 2), ("int", 3), ("int", 4), ("int", 8), ("fp8_e4m3", 8), ("fp8_e5m2", 8)]
# Per element: relative rounding of the FP8 significand, and half the smallest subnormal (in
# units of the scale) for elements that land in the FP8 subnormal range.
FP8_BOUNDS = {"fp8_e4m3": (2.0**-4, 2.0**-10), "fp8_e5m2": (2.0**-3, 2.0**-17)}

SPEC_MATRIX = [
    pytest.param(fmt, bits, axis, sym, id=f"{fmt}{bits}-{axis}-{'sym' if sym else 'asym'}")
    for (fmt, bits), axis, sym in itertools.product(CODES, ["token", "channel"], [False, True])
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(seed: int = 0, magnitude: float = 1.0, shape: tuple[int, ...] = (B, H, T, D)) -> torch.Tensor:
    """Gaussian K/V-like data with a few outlier channels (as keys have)."""
    x = torch.randn(shape, generator=_gen(seed))
    x[..., 3] *= 20
    x[..., 17] += 5
    return x * magnitude


def _groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Independent re-implementation of the grouping: one group per slice of the last axis."""
    if spec.axis.value == "token":
        return x.unflatten(-1, (-1, spec.group_size))
    return x.unflatten(-2, (-1, spec.group_size)).transpose(-1, -2)


def _expand(per_group: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A per-group tensor (the shape of the scales) broadcast back to one value per element."""
    dim = -1 if spec.axis.value == "token" else -2
    return per_group.float().repeat_interleave(spec.group_size, dim)


def _bound(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-element bound on |x - x^|: half a step of the int grid, or FP8 significand rounding."""
    s = _expand(scale, spec)
    fp32_slack = 2.0**-20 * _expand(_groups(x.abs(), spec).amax(-1), spec)
    if spec.is_fp8:
        rel, sub = FP8_BOUNDS[spec.format.value]
        return rel * x.abs() + sub * s + fp32_slack
    return s / 2 + fp32_slack


def _roundtrip(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    scale, zero = choose_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    return dequantize(codes, scale, zero, spec), scale, zero


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [8, 64, 128])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3, 7)], ids=["1d", "2d", "4d"])
def test_pack_unpack_exact_inverse(bits: int, size: int, lead: tuple[int, ...]) -> None:
    codes = torch.randint(0, 2**bits, (*lead, size), generator=_gen(bits * size), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, size * bits // 8) == (*lead, packed_size(size, bits))
    assert torch.equal(unpack(packed, bits), codes)

    out = torch.full((*lead, size), -1.0)
    assert unpack(packed, bits, out=out) is out
    assert torch.equal(out, codes.float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_into_strided_view(bits: int) -> None:
    """Storage unpacks pages into token slices of a workspace: a non-contiguous ``out``."""
    codes = torch.randint(0, 2**bits, (2, 3, 10, 64), generator=_gen(bits), dtype=torch.uint8)
    workspace = torch.full((2, 3, 30, 64), 7.0, dtype=torch.float16)
    view = workspace[:, :, 5:15]
    assert not view.is_contiguous()
    unpack(pack(codes, bits), bits, out=view)
    assert torch.equal(workspace[:, :, 5:15], codes.half())
    assert (workspace[:, :, :5] == 7).all() and (workspace[:, :, 15:] == 7).all()


def test_packed_bytes_per_8_codes() -> None:
    """3-bit codes really take 3 bytes per 8 codes (no padding to 4 bits)."""
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    assert {bits: pack(codes, bits).shape[-1] for bits in (2, 3, 4, 8)} == {2: 16, 3: 24, 4: 32, 8: 64}


@pytest.mark.parametrize("bits", [2, 4])
def test_planar_layout(bits: int) -> None:
    """Byte j holds codes j + k * size / n at bit offset k * bits (the layout kernels read)."""
    size, n = 16, 8 // bits
    codes = torch.randint(0, 2**bits, (size,), generator=_gen(1), dtype=torch.uint8)
    packed = pack(codes, bits).tolist()
    width = size // n
    expected = [sum(int(codes[j + k * width]) << (k * bits) for k in range(n)) for j in range(width)]
    assert packed == expected


def test_3bit_layout() -> None:
    """Byte plane p of group j holds bits 8p..8p+7 of sum_k code[j + k * size / 8] << 3k."""
    size = 16
    codes = torch.randint(0, 8, (size,), generator=_gen(2), dtype=torch.uint8)
    packed = pack(codes, 3).tolist()
    width = size // 8
    for j in range(width):
        word = sum(int(codes[j + k * width]) << (3 * k) for k in range(8))
        assert [packed[p * width + j] for p in range(3)] == [(word >> (8 * p)) & 0xFF for p in range(3)]


# ------------------------------------------------------------------------------- primitives: error


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("magnitude", [1.0, 1e-3], ids=["unit", "tiny"])
@pytest.mark.parametrize(("fmt", "bits", "axis", "symmetric"), SPEC_MATRIX)
def test_dequantization_error_bound(
    fmt: str, bits: int, axis: str, symmetric: bool, magnitude: float, scale_dtype: str
) -> None:
    """Int: |x - x^| <= scale / 2 per group. FP8: relative rounding of the significand.

    The ``tiny`` data puts fp16 scales in the subnormal range, where rounding the scale to
    nearest (instead of up) used to saturate codes and break the bound.
    """
    spec = QuantSpec(
        bits=bits, format=fmt, axis=axis, group_size=GROUP, symmetric=symmetric, scale_dtype=scale_dtype
    )
    x = _data(seed=bits, magnitude=magnitude)
    xh, scale, zero = _roundtrip(x, spec)
    assert xh.shape == x.shape and xh.dtype == torch.float32
    assert torch.isfinite(xh).all()

    err, bound = (x - xh).abs(), _bound(x, scale, spec)
    assert (err <= bound).all(), f"worst error / bound: {(err / bound).max().item():.4f}"
    # The bound is tight: no format is much better than its grid (guards a vacuous test).
    assert (err > bound / 4).any()


@pytest.mark.parametrize(("fmt", "bits", "axis", "symmetric"), SPEC_MATRIX)
def test_qparams_shapes_and_stored_dtype(fmt: str, bits: int, axis: str, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, format=fmt, axis=axis, group_size=GROUP, symmetric=symmetric)
    x = _data()
    scale, zero = choose_qparams(x, spec)
    expected = (B, H, T, D // GROUP) if axis == "token" else (B, H, T // GROUP, D)
    assert scale.shape == expected and scale.dtype == torch.float16
    assert (scale > 0).all()
    if spec.has_zero:
        assert zero is not None and zero.shape == expected and zero.dtype == torch.float16
        # KIVI zero point: the group minimum, rounded down so no element lies below it.
        lo = _groups(x, spec).amin(-1)
        assert (zero.float() <= lo).all()
        assert (torch.nextafter(zero, torch.full_like(zero, float("inf"))).float() > lo).all()
    else:
        assert zero is None
    codes = quantize(x, scale, zero, spec)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    if not spec.is_fp8:
        assert int(codes.max()) < 2**bits
        if symmetric:
            assert int(codes.min()) >= 1  # symmetric grid: codes 1 .. 2**bits - 1 around mid


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_scales_are_local_to_their_group(axis: str) -> None:
    """Per-token groups share a scale along head_dim, per-channel groups along tokens: an
    outlier changes exactly one scale, the one of its group."""
    spec = QuantSpec(bits=4, axis=axis, group_size=16)
    x = _data()
    scale, zero = choose_qparams(x, spec)
    b, h, t, d = 1, 2, 37, 21
    y = x.clone()
    y[b, h, t, d] = 1000.0
    scale2, zero2 = choose_qparams(y, spec)
    changed = (scale2 != scale).nonzero().tolist()
    group = [b, h, t, d // 16] if axis == "token" else [b, h, t // 16, d]
    assert changed == [group]
    assert torch.equal(zero, zero2)  # the minimum of that group did not move


@pytest.mark.parametrize(("fmt", "bits", "axis", "symmetric"), SPEC_MATRIX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_tensor_matches_pure_functions(
    fmt: str, bits: int, axis: str, symmetric: bool, dtype: torch.dtype
) -> None:
    spec = QuantSpec(bits=bits, format=fmt, axis=axis, group_size=GROUP, symmetric=symmetric)
    x = _data(seed=3).to(dtype)
    scale, zero = choose_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    expected = dequantize(codes, scale, zero, spec, dtype=dtype)

    packed = PackedTensor.from_float(x, spec)
    assert torch.equal(packed.scale, scale)
    assert (packed.zero is None) == (zero is None) and (zero is None or torch.equal(packed.zero, zero))
    assert packed.num_tokens == T and packed.head_dim == D
    assert torch.equal(packed.dequantize(dtype=dtype), expected)
    out = torch.empty(B, H, T, D, dtype=dtype)
    assert packed.dequantize(out=out) is out
    assert torch.equal(out, expected)
    # dequantize(out=...) of the pure function writes the same values.
    out2 = torch.empty_like(out)
    assert dequantize(codes, scale, zero, spec, out=out2) is out2 and torch.equal(out2, expected)


CONSTANTS = [0.0, 1.0, -1.0, 3.25, -7.5, 1e-7, -1e-7, 1e-3, 100.0, -100.0, 0.1, 42.0, 1e-30, 5e-5, -2.0, 6e4]


@pytest.mark.parametrize(("fmt", "bits", "axis", "symmetric"), SPEC_MATRIX)
def test_constant_groups_are_finite_and_close(fmt: str, bits: int, axis: str, symmetric: bool) -> None:
    """All-equal groups (zero range) must not divide by zero: no NaN/inf, value kept."""
    g = 8
    spec = QuantSpec(bits=bits, format=fmt, axis=axis, group_size=g, symmetric=symmetric)
    values = torch.tensor(CONSTANTS).reshape(4, 4)
    # Constant on g x g tiles: constant within the groups of either axis.
    x = values.repeat_interleave(g, 0).repeat_interleave(g, 1).expand(1, 2, 4 * g, 4 * g)
    xh, scale, _ = _roundtrip(x, spec)
    assert torch.isfinite(scale).all() and torch.isfinite(xh).all()
    assert ((x - xh).abs() <= _bound(x, scale, spec)).all()

    zeros = torch.zeros(1, 1, GROUP, 64)
    assert torch.equal(PackedTensor.from_float(zeros, spec).dequantize(), zeros)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_decreases_with_bits(axis: str, symmetric: bool) -> None:
    x = _data(seed=5)

    def rel_mse(**kw: object) -> float:
        spec = QuantSpec(axis=axis, group_size=GROUP, symmetric=symmetric, **kw)
        xh = PackedTensor.from_float(x, spec).dequantize()
        return float(((x - xh) ** 2).mean() / (x**2).mean())

    mse = [rel_mse(bits=b) for b in (2, 3, 4, 8)]
    assert all(hi > 2 * lo for hi, lo in itertools.pairwise(mse)), mse
    # More significand bits beat more exponent bits on Gaussian data.
    assert rel_mse(bits=8, format="fp8_e4m3") < rel_mse(bits=8, format="fp8_e5m2") < mse[2]


def test_fp8_codes_are_raw_fp8_bytes() -> None:
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=GROUP)
    x = _data()
    scale, _ = choose_qparams(x, spec)
    codes = quantize(x, scale, None, spec)
    expected = (_groups(x, spec) / scale.float().unsqueeze(-1)).to(torch.float8_e4m3fn)
    assert torch.equal(codes, expected.flatten(-2).view(torch.uint8))


# ----------------------------------------------------------------------------- PackedTensor storage


@pytest.mark.parametrize(("fmt", "bits", "axis", "symmetric"), SPEC_MATRIX)
def test_packed_tensor_empty_copy_and_slices(fmt: str, bits: int, axis: str, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, format=fmt, axis=axis, group_size=GROUP, symmetric=symmetric)
    x = _data(seed=7)
    packed = PackedTensor.from_float(x, spec)
    empty = PackedTensor.empty(B, H, 2 * T, D, spec, torch.device("cpu"))
    assert [t.shape[-2] for t in empty.tensors()] == [2 * t.shape[-2] for t in packed.tensors()]
    assert [t.dtype for t in empty.tensors()] == [t.dtype for t in packed.tensors()]

    empty.slice_tokens(T, 2 * T).copy_(packed)
    assert torch.equal(empty.slice_tokens(T, 2 * T).dequantize(), packed.dequantize())
    # A slice on group boundaries is the quantization of that slice (groups are independent).
    half = PackedTensor.from_float(x[:, :, GROUP : 2 * GROUP], spec)
    assert torch.equal(packed.slice_tokens(GROUP, 2 * GROUP).dequantize(), half.dequantize())

    swapped = packed.map(lambda t: t.flip(0))
    assert torch.equal(swapped.dequantize(), packed.dequantize().flip(0))


# ----- ExactSpec: the exact format knows its size like the quantized specs ----------------------


def test_exact_spec_bytes_per_token() -> None:
    from kvsqueeze.quant.exact import FP16, ExactSpec

    assert ExactSpec(torch.float16) == FP16 and FP16.is_exact and not QuantSpec(bits=4).is_exact
    assert FP16.bytes_per_token(3, 64) == 3 * 64 * 2 and FP16.bits_per_element == 16
    assert ExactSpec(torch.float32).bytes_per_token(3, 64) == 3 * 64 * 4
    assert FP16.kv_bytes_per_token(30, 3, 64) == 2 * 30 * 3 * 64 * 2  # keys + values, every layer
    assert ExactSpec.for_itemsize(4) == ExactSpec(torch.float32)
    with pytest.raises(ValueError, match=r"exact_bytes: 3; allowed: \[2, 4, 8\]"):
        ExactSpec.for_itemsize(3)
    with pytest.raises(ValueError, match="dtype None"):
        ExactSpec().bytes_per_token(3, 64)


def test_exact_blocks_are_sized_by_their_spec() -> None:
    from kvsqueeze.config import preset
    from kvsqueeze.quant.exact import FP16, ExactSpec
    from kvsqueeze.storage.block_pool import BlockPool

    pool = BlockPool(None, 16, per_slab=4)  # None: exact, as in CacheConfig
    assert pool.spec == ExactSpec() and pool.block_nbytes == 0
    ids = pool.allocate(3, like=torch.zeros(1, 2, 16, 64, dtype=torch.float16))
    pool.write(ids, pool.encode(torch.randn(1, 2, 48, 64).half()))
    assert pool.spec == FP16  # the dtype is fixed by the first write
    assert pool.block_nbytes == round(16 * FP16.bytes_per_token(2, 64)) == 16 * 2 * 64 * 2
    assert pool.nbytes == sum(t.numel() * t.element_size() for t in pool.tensors())
    none = preset("none")
    assert none.bytes_per_token(2, 4, 64) == FP16.kv_bytes_per_token(2, 4, 64)
    assert none.bytes_per_token(2, 4, 64, exact_bytes=ExactSpec(torch.float32)) == none.bytes_per_token(
        2, 4, 64, exact_bytes=4
    )
