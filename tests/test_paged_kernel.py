"""Native kernels reading K/V through block tables (`PagedPart`) in place, against contiguous storage.

Every paged part here is built from a contiguous `PackedTensor` (or `ExactTensor`) by cutting it
into blocks and scattering them over a pool of slabs at shuffled block ids (the last slab partial,
unused blocks full of NaN / garbage codes that must never be read; with ``share``, rows of the
batch reuse row 0's first blocks, as prefix sharing does). Then:

1. dequantization: native ``dequantize_into`` == ``PagedPart.dequantize`` == the contiguous
   tensor's ``dequantize``, bit for bit, and ``PagedPart.gather`` == the contiguous tensor (codebook
   and outlier formats included);
2. fused attention over [exact sinks | paged history | exact window] == the same segments with the
   contiguous history (atol 1e-5: only the tiles differ, which never cross a block), for the fast
   path (int 2/4/8 per-channel keys, integer or codebook per-token values, head_dim 64 and 128) and
   the generic one (3-bit, FP8, per-token keys, codebook keys, outliers, exact slabs), several block
   sizes, batches, query lengths and masks;
3. bad tables and shapes are refused, naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.attention.parts import Segment
from kvsqueeze.config import QuantSpec
from kvsqueeze.kernels import build, cpu
from kvsqueeze.kernels.dequantize import dequantize_into
from kvsqueeze.kernels.sources import readable, source_meta
from kvsqueeze.quant import PackedTensor
from kvsqueeze.quant.exact import ExactTensor
from kvsqueeze.quant.paged import PagedPart

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
SINKS, WINDOW = 3, 5  # exact tokens before and after the history

SPECS = {
    "int2-channel": QuantSpec(bits=2, axis="channel", group_size=16),
    "int4-channel": QuantSpec(bits=4, axis="channel", group_size=16),
    "int8-channel-sym": QuantSpec(bits=8, axis="channel", group_size=16, symmetric=True),
    "int2-token-g32": QuantSpec(bits=2, axis="token", group_size=32),
    "int4-token": QuantSpec(bits=4, axis="token", group_size=16),
    "int8-token-g64": QuantSpec(bits=8, axis="token", group_size=64),
    "int3-channel": QuantSpec(bits=3, axis="channel", group_size=16),
    "int3-token": QuantSpec(bits=3, axis="token", group_size=64),
    "int4-channel-bf16-scales": QuantSpec(bits=4, axis="channel", group_size=16, scale_dtype="bfloat16"),
    "fp8-e4m3-channel": QuantSpec(bits=8, format="fp8_e4m3", axis="channel", group_size=16),
    "fp8-e4m3-token": QuantSpec(bits=8, format="fp8_e4m3", axis="token", group_size=64),
    "fp8-e5m2-token": QuantSpec(bits=8, format="fp8_e5m2", axis="token", group_size=32),
    # codebooks and outliers (issue 16): blocks of 16 hold whole outlier blocks
    "nf2-token-sym": QuantSpec(bits=2, format="nf", axis="token", group_size=32, symmetric=True),
    "nf3-token": QuantSpec(bits=3, format="nf", axis="token", group_size=64),
    "nf4-channel": QuantSpec(bits=4, format="nf", axis="channel", group_size=16),
    "int3-channel-outliers": QuantSpec(
        bits=3, axis="channel", group_size=16, outlier_fraction=0.01, outlier_tokens=16
    ),
    "nf2-token-outliers": QuantSpec(
        bits=2,
        format="nf",
        axis="token",
        group_size=64,
        symmetric=True,
        outlier_fraction=0.02,
        outlier_tokens=16,
    ),
}
# name: (key format, value format, head_dim); a format is a SPECS name or an exact dtype.
FORMATS = {
    "k2v2": ("int2-channel", "int2-token-g32", 64),  # the fast path (KIVI layout) ...
    "k4v4": ("int4-channel", "int4-token", 64),
    "k8v8": ("int8-channel-sym", "int8-token-g64", 64),
    "k4v2-d128": ("int4-channel", "int2-token-g32", 128),
    "k3v3": ("int3-channel", "int3-token", 64),  # ... and the generic reader
    "fp8": ("fp8-e4m3-channel", "fp8-e4m3-token", 64),
    "token-keys": ("int4-token", "int4-token", 64),
    "nf-values": ("int4-channel", "nf2-token-sym", 64),  # codebook values: the fast path
    "nf-values-d128": ("int8-channel-sym", "nf3-token", 128),
    "nf-keys": ("nf4-channel", "nf2-token-sym", 64),  # ... codebook keys, outliers: generic
    "outliers": ("int3-channel-outliers", "nf2-token-outliers", 64),
    "exact-f32": (torch.float32, torch.float32, 64),
    "exact-f16": (torch.float16, torch.float16, 64),
}


def encode(x: torch.Tensor, fmt: str | torch.dtype) -> PackedTensor | ExactTensor:
    if isinstance(fmt, torch.dtype):
        return ExactTensor(x.to(fmt))
    return PackedTensor.from_float(x, SPECS[fmt])


def garbage(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, ...) of ``t``'s dtype: NaN, or codes 255, wherever no block is written."""
    shape = (blocks, *t.shape[1:])
    if t.dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=t.dtype)
    return torch.full(shape, 255, dtype=t.dtype)


def paginate(
    part: PackedTensor | ExactTensor, block: int, per_slab: int, share: int = 0, spare: int = 3, seed: int = 0
) -> PagedPart:
    """``part`` (batch, kv_heads, tokens, ...) as a `PagedPart`: its blocks at shuffled ids of a pool
    of slabs of ``per_slab`` blocks (``spare`` unused blocks); rows b > 0 reuse row 0's first
    ``share`` blocks (which must hold the same tokens). The table has two extra columns of -7."""
    held = part.tensors()
    batch, tokens = held[0].shape[0], held[0].shape[2]
    nb = tokens // block
    cells = [(b, k) for b in range(batch) for k in range(nb) if b == 0 or k >= share]
    pool = len(cells) + spare
    pool += pool % per_slab == 0  # the last slab partial
    ids = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[: len(cells)].tolist()
    table = torch.full((batch, nb + 2), -7, dtype=torch.int32)
    for (b, k), i in zip(cells, ids, strict=True):
        table[b, k] = i
    table[1:, :share] = table[0, :share]
    columns = []  # per held tensor: its slabs
    for t in held:
        rows = t.shape[2] * block // tokens  # rows of this tensor per block
        blocks = t.unflatten(2, (nb, rows)).transpose(1, 2)  # (batch, nb, kv_heads, rows, cols)
        buf = garbage(blocks.flatten(0, 1), pool)
        for (b, k), i in zip(cells, ids, strict=True):
            buf[i] = blocks[b, k]
        columns.append([buf[j : j + per_slab].clone() for j in range(0, pool, per_slab)])
    slabs = []
    for j in range(len(columns[0])):
        it = iter([c[j] for c in columns])
        slabs.append(part.map(lambda _, it=it: next(it)))
    return PagedPart(tuple(slabs), table, block, per_slab, tokens)


def history(batch: int, tokens: int, head_dim: int, fmt, block: int, share: int, seed: int = 0):
    """(contiguous part, the same as a PagedPart); rows share their first ``share`` blocks."""
    x = torch.randn(batch, 2, tokens, head_dim, generator=torch.Generator().manual_seed(seed)) * 2
    x[1:, :, : share * block] = x[0, :, : share * block]
    part = encode(x, fmt)
    return part, paginate(part, block, per_slab=5 if block < 64 else 3, share=share, seed=seed)


def segments(history_k, history_v, batch: int, head_dim: int, n: int) -> list[Segment]:
    gen = torch.Generator().manual_seed(7)

    def exact(tokens: int) -> ExactTensor:
        return ExactTensor(torch.randn(batch, 2, tokens, head_dim, generator=gen))

    return [
        Segment(exact(SINKS), exact(SINKS), SINKS),
        Segment(history_k, history_v, n),
        Segment(exact(WINDOW), exact(WINDOW), WINDOW),
    ]


def masks(batch: int, q_len: int, total: int) -> list[tuple[torch.Tensor | None, bool]]:
    """(mask, causal): causal without a mask, a bool mask (left padding of row 0, a row that sees
    nothing), an additive float mask."""
    bool_mask = torch.ones(batch, 1, q_len, total, dtype=torch.bool)
    bool_mask[0, :, :, :20] = False
    bool_mask[-1, :, 0, : total - WINDOW] = False
    if q_len > 1:
        bool_mask[-1, :, 1] = False
    additive = torch.randn(batch, 6, q_len, total, generator=torch.Generator().manual_seed(3))
    additive.masked_fill_(~bool_mask, torch.finfo(torch.float32).min)
    return [(None, True), (bool_mask, False), (additive, False)]


def check_attention(contiguous: list[Segment], paged: list[Segment], batch: int, head_dim: int) -> None:
    total = sum(s.num_tokens for s in paged)
    for q_len in (1, 5):
        q = torch.randn(batch, 6, q_len, head_dim, generator=torch.Generator().manual_seed(q_len))
        for mask, causal in masks(batch, q_len, total):
            want = cpu.fused_attention(q, contiguous, mask, 0.125, causal)
            got = cpu.fused_attention(q, paged, mask, 0.125, causal)
            assert want.isfinite().all()
            err = (got - want).abs().max().item()
            assert torch.allclose(got, want, rtol=0, atol=ATOL), (q_len, mask is not None, err)


# ------------------------------------------------------------------------ 1. dequantization


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("fmt", [*SPECS, torch.float32, torch.float16], ids=str)
def test_paged_dequantize_and_gather_match_contiguous(fmt, block) -> None:
    """Torch reference: `PagedPart.dequantize` and `gather` against the contiguous tensor."""
    part, paged = history(3, 4 * block, 64, fmt, block, share=1)
    gathered = paged.gather()
    assert type(gathered) is type(part)
    for got, want in zip(gathered.tensors(), part.tensors(), strict=True):
        assert got.shape == want.shape and torch.equal(got, want), "gather: another tensor"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = part.dequantize(dtype=dtype)
        got = paged.dequantize(torch.empty(want.shape, dtype=dtype))
        assert torch.equal(got, want), dtype


@needs_kernels
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("fmt", [*SPECS, torch.float32, torch.float16], ids=str)
def test_native_paged_dequantize_is_bit_exact(fmt, block) -> None:
    part, paged = history(3, 4 * block, 64, fmt, block, share=2)
    assert readable(paged)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = part.dequantize(dtype=dtype)
        buf = torch.full((3, 2, 300, 64), float("nan"), dtype=dtype)
        out = buf[:, :, 20 : 20 + 4 * block]  # a slice of a larger buffer
        assert cpu.dequantize_into(paged, out) is out and torch.equal(out, want), dtype
        assert buf[:, :, :20].isnan().all() and buf[:, :, 20 + 4 * block :].isnan().all()
        out.fill_(float("nan"))
        assert torch.equal(dequantize_into(paged, out), want)  # the dispatcher takes the kernel


def test_dequantize_dispatch_without_kernels(monkeypatch) -> None:
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    part, paged = history(2, 64, 64, "int4-channel", 16, share=1)
    want = part.dequantize(dtype=torch.float16)
    assert torch.equal(dequantize_into(paged, torch.empty(want.shape, dtype=torch.float16)), want)


# ------------------------------------------------------------------------ 2. fused attention


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("name", FORMATS)
def test_paged_fused_attention_matches_contiguous(name, block, batch) -> None:
    kfmt, vfmt, head_dim = FORMATS[name]
    tokens, share = 4 * block, 2 if batch > 1 else 0
    k, pk = history(batch, tokens, head_dim, kfmt, block, share, seed=1)
    v, pv = history(batch, tokens, head_dim, vfmt, block, share, seed=2)
    contiguous = segments(k, v, batch, head_dim, tokens)
    paged = segments(pk, pv, batch, head_dim, tokens)
    check_attention(contiguous, paged, batch, head_dim)


@needs_kernels
@pytest.mark.parametrize("name", ["k4v4", "k3v3"])
def test_paged_fused_attention_long_history_split_over_work_items(name) -> None:
    """1280 tokens at batch 1: the tokens split over work items at positions that are not block
    boundaries of the paged segment (3 sinks before it), so tiles must stop at every block."""
    kfmt, vfmt, head_dim = FORMATS[name]
    k, pk = history(1, 1280, head_dim, kfmt, 64, 0, seed=3)
    v, pv = history(1, 1280, head_dim, vfmt, 64, 0, seed=4)
    check_attention(segments(k, v, 1, head_dim, 1280), segments(pk, pv, 1, head_dim, 1280), 1, head_dim)


@needs_kernels
@pytest.mark.parametrize("name", ["k4v4", "fp8"])
def test_paged_keys_and_values_with_other_blocks_and_fewer_tokens(name) -> None:
    """Keys in blocks of 32, values in blocks of 16 (or contiguous); a segment reading only the first
    blocks of its parts (``slice_tokens``), the table holding more."""
    kfmt, vfmt, head_dim = FORMATS[name]
    x = torch.randn(3, 2, 128, head_dim, generator=torch.Generator().manual_seed(5))
    k, v = encode(x, kfmt), encode(x.flip(-1), vfmt)
    pk, pv = paginate(k, 32, 3, seed=5), paginate(v, 16, 7, seed=6)
    for n in (128, 96):
        contiguous = segments(k, v, 3, head_dim, n)
        check_attention(contiguous, segments(pk.slice_tokens(0, n), pv, 3, head_dim, n), 3, head_dim)
        check_attention(contiguous, segments(pk, v, 3, head_dim, n), 3, head_dim)


def test_triton_module_gathers_paged_segments() -> None:
    """The CUDA module's fallback (`PagedPart.gather`), on CPU through its torch branch (formats its
    Triton program does not read): the same as the contiguous segments."""
    from kvsqueeze.kernels import triton_attention

    for name in ("k3v3", "fp8", "exact-f16"):
        kfmt, vfmt, head_dim = FORMATS[name]
        k, pk = history(3, 128, head_dim, kfmt, 32, 2, seed=1)
        v, pv = history(3, 128, head_dim, vfmt, 32, 2, seed=2)
        q = torch.randn(3, 6, 5, head_dim)
        want = triton_attention.fused_attention(q, segments(k, v, 3, head_dim, 128), None, 0.125, True)
        got = triton_attention.fused_attention(q, segments(pk, pv, 3, head_dim, 128), None, 0.125, True)
        assert torch.equal(got, want), name


# ------------------------------------------------------------------------ 3. refusals


def _with(paged: PagedPart, **changes) -> PagedPart:
    fields = {f: getattr(paged, f) for f in ("slabs", "table", "block_size", "per_slab", "num_tokens")}
    return PagedPart(**{**fields, **changes})


@needs_kernels
def test_bad_tables_and_shapes_are_refused() -> None:
    k, pk = history(2, 64, 64, "int4-channel", 16, 0)
    v, pv = history(2, 64, 64, "int4-token", 16, 0)
    q = torch.randn(2, 6, 1, 64)

    def attend(key: PagedPart, value: PagedPart = pv, n: int = 64) -> None:
        cpu.fused_attention(q, segments(key, value, 2, 64, n), None, 0.125, True)

    attend(pk)  # fine
    pool = sum(s.codes.shape[0] for s in pk.slabs)
    for bad in (pool, -1):
        table = pk.table.clone()
        table[1, 2] = bad
        with pytest.raises(RuntimeError, match=rf"block id {bad} \(row 1, block 2\) out of range"):
            attend(_with(pk, table=table))
        with pytest.raises(RuntimeError, match="out of range"):
            cpu.dequantize_into(_with(pk, table=table), torch.empty(2, 2, 64, 64))
    table = pk.table.clone()
    table[1, 4:] = pool + 5  # beyond the tokens read: never looked at
    attend(_with(pk, table=table))
    with pytest.raises(RuntimeError, match="num_tokens 56 is not a multiple of the block size 16"):
        attend(_with(pk, num_tokens=56), _with(pv, num_tokens=56), n=56)
    with pytest.raises(RuntimeError, match="num_tokens 56 is not a multiple of the block size 16"):
        cpu.dequantize_into(_with(pk, num_tokens=56), torch.empty(2, 2, 56, 64))
    with pytest.raises(RuntimeError, match=r"block table is \[3, 6\]; expected \(batch 2"):
        attend(_with(pk, table=torch.cat([pk.table, pk.table[:1]])))
    with pytest.raises(RuntimeError, match=r"block table is \[2, 3\]; expected \(batch 2, >= 4 blocks\)"):
        attend(_with(pk, table=pk.table[:, :3].contiguous()))
    with pytest.raises(RuntimeError, match="block table must be a 2-D int32"):
        attend(_with(pk, table=pk.table.long()))
    with pytest.raises(RuntimeError, match="block size 8 is not a multiple of the per-channel group 16"):
        attend(_with(pk, block_size=8), n=64)
    with pytest.raises(RuntimeError, match="slab 0 holds 5 blocks; allowed: 4"):
        attend(_with(pk, per_slab=4))
    assert not readable(_with(pk, table=pk.table.long()))


def test_slabs_of_another_format_are_refused() -> None:
    _, pk = history(2, 64, 64, "int4-channel", 16, 0)
    _, other = history(2, 64, 64, "int4-token", 16, 0)
    mixed = _with(pk, slabs=(pk.slabs[0], other.slabs[1]))
    assert not readable(mixed)
    with pytest.raises(ValueError, match="slab 1 has another format than slab 0"):
        source_meta(mixed, [])


def test_paged_meta_layout() -> None:
    """data/scale/zero/outliers name slab 0's tensors, slab j's at index + j * slab_stride; the table
    after the slabs, the codebook levels after the table."""
    _, pk = history(2, 64, 64, "int4-channel", 16, 0)
    tensors: list[torch.Tensor] = [torch.empty(0)]
    row = source_meta(pk, tensors)
    kind, bits, axis, group, mid, data, scale, zero, lut, table, block, per_slab, slabs, stride = row[:14]
    assert (kind, bits, axis, group, block, per_slab, slabs, stride) == (1, 4, 1, 16, 16, 5, len(pk.slabs), 3)
    assert tensors[table] is pk.table and table == len(tensors) - 1
    assert row[14:] == [-1, -1, 1, -1, -1, -1, 0]  # no outliers, no transform
    for j, slab in enumerate(pk.slabs):
        assert tensors[data + j * stride] is slab.codes
        assert tensors[scale + j * stride] is slab.scale and tensors[zero + j * stride] is slab.zero
    assert source_meta(ExactTensor(torch.empty(1, 1, 1, 4)), [])[9:14] == [-1, 0, 1, 1, 0]
    _, po = history(2, 64, 64, "nf2-token-outliers", 16, 0)
    tensors = []
    row = source_meta(po, tensors)
    data, table, stride, oidx, oval, otokens = row[5], row[9], row[13], row[14], row[15], row[16]
    assert (row[0], row[4], stride, otokens) == (3, 0, 4, 16)  # codebook, no code offset
    assert torch.equal(tensors[row[8]], torch.tensor(SPECS["nf2-token-outliers"].levels))
    assert row[8] == table + 1 == len(tensors) - 1
    for j, slab in enumerate(po.slabs):
        assert (
            tensors[oidx + j * stride] is slab.outlier_index
            and tensors[oval + j * stride] is slab.outlier_value
        )
