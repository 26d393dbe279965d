"""Fused reads of every stored format and transform (issue 16), and the int8 key dot products.

1. Kernel level, synthetic segments [exact sinks | packed part | exact tail]: codebook values and keys
   (symmetric and not, 2/3/4 bits), 3-bit keys, outlier side stores, values rotated by the layer's
   Hadamard matrix, post-RoPE keys rotated, pre-RoPE keys (contiguous positions, and per-token
   positions as token-policy classes keep them) alone and rotated, head_dim 64 and 128, GQA,
   decode and chunks, against float64 attention on the reference path's keys and values
   (`PackedTensor.dequantize`, then `PartTransform.restore_`). Key dot "float": tolerance 2e-5 of
   max |output|, as tests/test_fused.py (measured <= 1.5e-6).
2. The int8 key dots (VNNI, AVX2, run whichever this CPU has): equal to a float64 emulation of the
   same algorithm (q (.) s rounded to int8 per row and key group) within 2e-5, and VNNI == AVX2 on
   4-bit keys; their error against exact attention is what int8 queries cost (bounded here, measured
   on models in docs/kernels.md).
3. Tiny Llama, the cache end to end: every ``best-*`` preset (generic versions on this model: NF
   values with outliers, pre-RoPE keys, rotated values), rotated keys, codebook keys, token policies
   with transforms: fused logits (key dot "float") == reference logits within tests/test_fused.py's
   1e-4; the cache really is fused (no fallback, no warning). The packed views dequantize with
   the transforms undone for other attention implementations, and the Triton module's torch branch
   (the CUDA path for these formats) undoes them too.
4. Embedded model (marker ``model``): the bundled best-* calibrations (per-layer 2/3/4/8-bit
   pre-RoPE keys, calibrated NF values, rotation) decode greedily to the same tokens fused and
   reference.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from test_fused import LOGIT_TOL, dense_attention, ids, rel_diff, run_chunks, tiny_models

from kvsqueeze.attention.parts import Segment
from kvsqueeze.config import PRESETS, CacheConfig, QuantSpec
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.kernels import cpu
from kvsqueeze.kernels.dequantize import dequantize_into
from kvsqueeze.policies.plan import TokenPolicy
from kvsqueeze.quant import PackedTensor
from kvsqueeze.quant.exact import ExactTensor
from kvsqueeze.quant.rope import Rope
from kvsqueeze.quant.rotation import rotation_matrix
from kvsqueeze.storage.transform import PageTransform, PartTransform

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")
pytestmark = pytest.mark.usefixtures("one_thread")

KERNEL_TOL = 2e-5

SPECS = {
    "int4c": QuantSpec(bits=4, axis="channel", group_size=64),
    "int3c": QuantSpec(bits=3, axis="channel", group_size=64),
    "int2c": QuantSpec(bits=2, axis="channel", group_size=32),
    "int8c": QuantSpec(bits=8, axis="channel", group_size=64),
    "int3c-outliers": QuantSpec(bits=3, axis="channel", group_size=64, outlier_fraction=0.0025),
    "nf4c": QuantSpec(bits=4, axis="channel", group_size=64, format="nf"),
    "int4t": QuantSpec(bits=4, axis="token", group_size=64),
    "nf2t-sym": QuantSpec(bits=2, axis="token", group_size=64, format="nf", symmetric=True),
    "nf3t-sym-g32": QuantSpec(bits=3, axis="token", group_size=32, format="nf", symmetric=True),
    "nf4t-asym-calibrated": QuantSpec(
        bits=4,
        axis="token",
        group_size=64,
        format="nf",
        codebook=tuple(round(-1 + 2 * (i / 15) ** 1.2, 4) for i in range(16)),
    ),  # fmt: skip
    "nf2t-outliers": QuantSpec(bits=2, axis="token", group_size=64, format="nf", outlier_fraction=0.01),
}
# (key spec, value spec, key transform, value transform): "rot" Hadamard rotation, "rope" pre-RoPE
# with contiguous positions, "rope@" pre-RoPE at scattered per-token positions (token policies).
CASES = [
    ("int4c", "nf2t-sym", None, None),  # codebook values, fast path
    ("int4c", "nf3t-sym-g32", "rope", "rot"),  # best-3bit / best-4bit layers
    ("int3c", "nf2t-sym", "rope", "rot"),  # best-2bit layers
    ("int2c", "nf4t-asym-calibrated", "rope", None),
    ("int8c", "int4t", None, "rot"),
    ("int4c", "int4t", "rot", None),  # rotated keys: the query is rotated
    ("int4c", "nf2t-sym", "rot rope", "rot"),  # rotated pre-RoPE keys: de-rotated per tile (generic)
    ("int3c-outliers", "nf2t-outliers", "rope", "rot"),  # outliers: generic reader
    ("nf4c", "int4t", "rope@", None),  # codebook keys at token-policy positions
    ("int4c", "nf2t-sym", "rope@", "rot"),
]
ROPE = Rope.default(64, 10000.0)


def transformed_part(x: torch.Tensor, spec: QuantSpec, kind: str | None, start: int, gen: torch.Generator):
    """(packed part, its transform, the reference path's reading of it) for tokens ``x`` (b, h, n, d)."""
    if kind is None:
        packed = PackedTensor.from_float(x, spec)
        return packed, None, packed.dequantize()
    d = x.shape[-1]
    rope = Rope.default(d, 10000.0) if "rope" in kind else None
    transform = PageTransform(rotation_matrix(d, 3) if "rot" in kind else None, rope, position_offset=start)
    at: int | torch.Tensor = 0
    if "@" in kind:  # cache positions of a token-policy class: increasing, with gaps, per (b, h)
        b, h, n, _ = x.shape
        at = torch.randint(1, 40, (b, h, n), generator=gen).cumsum(-1).to(torch.int32) + start
    packed = PackedTensor.from_float(transform.encode(x, at), spec)
    part = PartTransform(transform, at)
    return packed, part, part.restore_(packed.dequantize())


def make_case(case, batch: int, kv_heads: int, head_dim: int, tokens: int = 128, seed: int = 0):
    """Segments [exact sinks (4) | packed | exact tail (3)] and the reference keys and values."""
    kspec, vspec, ktf, vtf = case
    gen = torch.Generator().manual_seed(seed)

    def randn(n: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(batch, kv_heads, n, head_dim, generator=gen) * scale

    k, kt, kd = transformed_part(randn(tokens, 2.0), SPECS[kspec], ktf, 4, gen)
    v, vt, vd = transformed_part(randn(tokens), SPECS[vspec], vtf, 4, gen)
    sinks, tail = (randn(4), randn(4)), (randn(3), randn(3))
    segs = [
        Segment(ExactTensor(sinks[0]), ExactTensor(sinks[1]), 4),
        Segment(k, v, tokens, kt, vt),
        Segment(ExactTensor(tail[0]), ExactTensor(tail[1]), 3),
    ]
    keys = torch.cat([sinks[0], kd, tail[0]], dim=2)
    values = torch.cat([sinks[1], vd, tail[1]], dim=2)
    return segs, keys, values


def kernel_error(segs, keys, values, q: torch.Tensor, causal: bool = True) -> float:
    got = cpu.fused_attention(q, segs, None, 0.125, causal)
    want = dense_attention(q, keys, values, None, 0.125, causal)
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# ------------------------------------------------------------------------ 1. kernels, synthetic


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=["/".join(str(x) for x in c) for c in CASES])
def test_kernel_reads_formats_and_transforms(case, head_dim) -> None:
    segs, keys, values = make_case(case, batch=2, kv_heads=2, head_dim=head_dim)
    with cpu.using_key_dot("float"):
        for q_len in (1, 5):  # a decode query (3 rows per KV head) and a causal chunk
            q = torch.randn(2, 6, q_len, head_dim, generator=torch.Generator().manual_seed(q_len))
            assert kernel_error(segs, keys, values, q) < KERNEL_TOL


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128, 32])  # 32: the generic reader
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_reads_exact_rows(dtype, head_dim) -> None:
    """Exact segments (sinks, windows, the exact classes of h2o / snapkv / keep10) of every float
    dtype, several of them in a row as `ExactChunks` hands them over."""
    gen = torch.Generator().manual_seed(2)
    parts = [torch.randn(2, 2, n, head_dim, generator=gen).to(dtype) for n in (40, 256, 7, 1) for _ in (0, 1)]
    segs = [
        Segment(ExactTensor(k), ExactTensor(v), k.shape[2])
        for k, v in zip(parts[::2], parts[1::2], strict=True)
    ]
    keys, values = (torch.cat([p.double() for p in parts[i::2]], dim=2) for i in (0, 1))
    for q_len in (1, 4):
        q = torch.randn(2, 6, q_len, head_dim, generator=gen)
        assert kernel_error(segs, keys, values, q) < KERNEL_TOL


@needs_kernels
@pytest.mark.parametrize("spec", [s for s in SPECS if "nf" in s or "outliers" in s])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_dequantize_of_codebooks_and_outliers_is_bit_exact(spec, dtype) -> None:
    """The reference path's native dequantization now takes these formats too."""
    page = PackedTensor.from_float(torch.randn(2, 3, 128, 64) * 3, SPECS[spec])
    want = page.dequantize(dtype=dtype)
    buf = torch.full((2, 3, 160, 64), float("nan"), dtype=dtype)
    got = dequantize_into(page, buf[:, :, 16:144])
    assert torch.equal(got, want)
    assert buf[:, :, :16].isnan().all() and buf[:, :, 144:].isnan().all()


@needs_kernels
def test_kernel_refuses_a_rope_table_too_short_and_bad_positions() -> None:
    from kvsqueeze.kernels import sources

    segs, _, _ = make_case(CASES[1], batch=1, kv_heads=2, head_dim=64)
    tensors: list[torch.Tensor] = []
    meta = sources.source_meta(segs[1].key, tensors, segs[1].key_transform)
    table = tensors[meta[sources.META_FIELDS.index("rope")]]
    assert table.shape[0] >= 4 + 128 and table.shape[1] == 64
    cos, sin = ROPE.cos_sin(0, 200, torch.device("cpu"))
    assert torch.equal(table[:200, :32], cos[:, :32]) and torch.equal(table[:200, 32:], sin[:, :32])
    ext = cpu.cpu_extension()
    short = list(tensors)
    short[meta[sources.META_FIELDS.index("rope")]] = table[:100].contiguous()
    value_meta = sources.source_meta(segs[1].value, short)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(RuntimeError, match="RoPE table of 100 positions does not cover positions 4 to 131"):
        ext.fused_attention(q, short, meta + value_meta, [128], None, 0.125, True, sources.fp8_tables(), None)
    case = ("nf4c", "int4t", "rope@", None)
    segs, _, _ = make_case(case, batch=1, kv_heads=2, head_dim=64)
    bad = PartTransform(segs[1].key_transform.transform, segs[1].key_transform.start.clone())
    bad.start[0, 1, 7] = -3
    with pytest.raises(RuntimeError, match="position -3 outside the RoPE table"):
        cpu.fused_attention(q, [Segment(segs[1].key, segs[1].value, 128, bad, None)], None, 0.125, True)


# ------------------------------------------------------------------------ 2. int8 key dots


def int8_emulation(segs, keys, values, q: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Attention whose packed-key scores are computed as the int8 key dot does: per row and key
    group, ``qs = (q * scaling) * s`` (float32), ``a = max |qs| / qmax``, ``q8 = round(qs * qmax /
    max |qs|)`` (ties to even), score ``= a * sum(q8 * codes) + (q * scaling) . zero``; the rest in
    float64. Decode query, no mask; the plain KIVI case (per-channel asymmetric integer keys)."""
    from kvsqueeze.quant.packing import unpack

    packed = segs[1].key
    group = packed.spec.group_size
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    q32 = (q.float() * 0.125).reshape(b, hkv, hq // hkv, d)  # (b, hkv, g, d)
    codes = unpack(packed.codes, packed.spec.bits).double()  # (b, hkv, T, d)
    scores = []
    for i in range(packed.scale.shape[2]):
        qs = q32 * packed.scale[:, :, i, None].float()  # float32, as the kernel rounds it
        amax = qs.abs().amax(-1, keepdim=True)
        q8 = torch.round(qs * (qmax / amax)).double()
        a = (amax / qmax).double()
        tokens = slice(i * group, (i + 1) * group)
        qo = torch.einsum("bhgd,bhd->bhg", q32.double(), packed.zero[:, :, i].double())[..., None]
        scores.append(a * torch.einsum("bhgd,bhtd->bhgt", q8, codes[:, :, tokens]) + qo)
    exact = torch.einsum("bhgd,bhtd->bhgt", q32.double(), keys.double())
    n = packed.num_tokens
    all_scores = torch.cat([exact[..., :4], *scores, exact[..., 4 + n :]], dim=-1)
    out = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(all_scores, dim=-1), values.double())
    return out.reshape(b, hq, 1, d).transpose(1, 2)


INT8_DOTS = [dot for dot in ("vnni", "avx2") if cpu.available() and dot in cpu.key_dots_available()]


@needs_kernels
@pytest.mark.skipif(not INT8_DOTS, reason="this CPU (or build) has no int8 key dot product")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_key_dots_compute_their_algorithm(head_dim) -> None:
    segs, keys, values = make_case(("int4c", "int4t", None, None), batch=2, kv_heads=2, head_dim=head_dim)
    q = torch.randn(2, 6, 1, head_dim, generator=torch.Generator().manual_seed(4))
    want = int8_emulation(segs, keys, values, q)
    exact = dense_attention(q, keys, values, None, 0.125, True)
    outputs = []
    for dot in INT8_DOTS:
        with cpu.using_key_dot(dot):
            got = cpu.fused_attention(q, segs, None, 0.125, True)
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < KERNEL_TOL, dot
        # what int8 queries cost against exact attention on the same codes: bounded, not zero
        assert 1e-5 < ((got.double() - exact).abs().max() / exact.abs().max()).item() < 0.05, dot
        outputs.append(got)
    assert all(torch.equal(o, outputs[0]) for o in outputs)  # VNNI and AVX2: the same integers
    assert cpu.key_dot() == ("vnni" if "vnni" in INT8_DOTS else "avx2") or cpu.key_dot() == "float"


@needs_kernels
def test_key_dot_choice_is_validated() -> None:
    assert "float" in cpu.key_dots_available()
    with pytest.raises(ValueError, match=r"key dot: 'amx' is not available here; allowed: \['float'"):
        cpu.set_key_dot("amx")
    before = cpu.key_dot()
    with cpu.using_key_dot("float"):
        assert cpu.key_dot() == "float"
    assert cpu.key_dot() == before


# ------------------------------------------------------------------------ 3. tiny Llama end to end

CHUNKS = [100] + [1, 7] * 12 + [1] * 40  # chunked prefill then decode: 236 tokens
TRANSFORMED = {
    **{name: PRESETS[name] for name in ("best-4bit", "best-3bit", "best-2bit")},
    "rotated-keys": CacheConfig(rotate_keys=True, rotate_values=True),
    "rotated-pre-rope-keys": CacheConfig(rotate_keys=True, pre_rope_keys=True),
    "nf-keys": CacheConfig(
        key=QuantSpec(bits=4, axis="channel", group_size=64, format="nf"), pre_rope_keys=True
    ),
    "policy-pre-rope": PRESETS["best-3bit"].replace(
        tokens=TokenPolicy(scorer="knorm", keep_exact=0.1, keep_high=0.3), residual_window=128
    ),
}


@needs_kernels
@pytest.mark.parametrize("layout", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", TRANSFORMED)
def test_fused_matches_reference_with_transforms(name, layout) -> None:
    ref_model, fused_model = tiny_models(layout)
    tokens = ids(1, sum(CHUNKS), seed=5)
    config = TRANSFORMED[name]
    want = run_chunks(ref_model, config, tokens, CHUNKS)
    with warnings.catch_warnings(), cpu.using_key_dot("float"):
        warnings.simplefilter("error")  # no fallback warning: the fused path reads it
        got = run_chunks(fused_model, config, tokens, CHUNKS)
    assert SqueezedCache.from_model(fused_model, config).fused
    assert rel_diff(got, want) < LOGIT_TOL


@needs_kernels
def test_packed_views_undo_transforms_for_other_attention() -> None:
    """A fused best-3bit cache read by sdpa / eager: the views dequantize AND undo the rotation and
    pre-RoPE transform, so the logits are the reference path's."""
    ref_model, _ = tiny_models(2)
    model = copy.deepcopy(ref_model)
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        chunks = [150, 1, 7, 1]
        tokens = ids(1, sum(chunks))
        want = run_chunks(model, "best-3bit", tokens, chunks, fused=False)
        got = run_chunks(model, "best-3bit", tokens, chunks, fused=True)
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item()), attn


def test_triton_torch_branch_undoes_transforms() -> None:
    """The CUDA module computes formats its Triton program does not read (codebooks, outliers,
    transforms) in torch: run that branch on CPU against exact attention."""
    from kvsqueeze.kernels import triton_attention

    for case in CASES[1:4]:
        segs, keys, values = make_case(case, batch=2, kv_heads=2, head_dim=64)
        q = torch.randn(2, 6, 3, 64)
        got = triton_attention.fused_attention(q, segs, None, 0.125, True)
        want = dense_attention(q, keys, values, None, 0.125, True)
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < KERNEL_TOL, case


# ------------------------------------------------------------------------ 4. embedded model


@functools.cache
def _embedded():
    from kvsqueeze import load_model

    return load_model(attn_implementation="kvsqueeze")


@pytest.mark.model
@needs_kernels
@pytest.mark.parametrize("preset", ["best-4bit", "best-3bit", "best-2bit"])
def test_embedded_model_bundled_best_presets_greedy_identical(preset) -> None:
    from kvsqueeze.eval.text import default_text_file, load_text

    if default_text_file() is None:
        pytest.skip("needs ../shared/data/wikitext-2-raw-test.txt")
    model, tokenizer = _embedded()
    inputs = tokenizer(load_text(default_text_file())[:2600], return_tensors="pt")

    def generate(fused: bool) -> torch.Tensor:
        cache = SqueezedCache.from_model(model, preset, fused=fused)
        assert cache.fused == fused and cache.cache_config.layer_overrides  # the bundled calibration
        with torch.inference_mode(), cpu.using_key_dot("float"):
            out = model.generate(**inputs, cache=cache, max_new_tokens=24, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :]

    assert torch.equal(generate(True), generate(False))
