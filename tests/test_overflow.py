"""Scale / zero-point overflow (issue 11, item 5): K/V beyond the range of the metadata dtype.

A bf16 or fp32 model whose keys or values leave ±65504 (a ``k_proj`` bias of -70000 on one
channel) must not turn groups into NaN with the default float16 scales: quantization widens the
metadata to float32, stays accurate, warns once per store and reports the bytes it holds.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.integrations import SqueezedCache, register
from kvsqueeze.kernels.dequantize import dequantize_into
from kvsqueeze.quant import (
    MetadataOverflowWarning,
    PackedTensor,
    QuantSpec,
    metadata_overflows,
    safe_magnitude,
)
from kvsqueeze.quant.primitives import grouped
from kvsqueeze.storage.pages import PagedStore

B, H, T, D = 1, 2, 64, 64
GROUP = 32
OUTLIERS = dict(outlier_fraction=0.01, outlier_tokens=64)

FORMATS = [
    *(
        pytest.param(dict(bits=bits, symmetric=sym), id=f"int{bits}-{'sym' if sym else 'asym'}")
        for bits, sym in itertools.product((2, 3, 4, 8), (False, True))
    ),
    pytest.param(dict(bits=8, format="fp8_e4m3"), id="fp8_e4m3"),
    pytest.param(dict(bits=8, format="fp8_e5m2"), id="fp8_e5m2"),
    pytest.param(dict(bits=2, format="nf"), id="nf2-asym"),
    pytest.param(dict(bits=4, format="nf"), id="nf4-asym"),
    pytest.param(dict(bits=3, format="nf", symmetric=True), id="nf3-sym"),
    pytest.param(dict(bits=4, **OUTLIERS), id="int4-outliers"),
    pytest.param(dict(bits=2, format="nf", **OUTLIERS), id="nf2-outliers"),
]
AXES = [pytest.param("channel", id="keys-per-channel"), pytest.param("token", id="values-per-token")]
OFFSETS = ("-70000", "+1e6", "range60000")
# (offset, input dtype): fp16 inputs cannot hold -70000 or 1e6, only ranges beyond 65504
CASES = [
    pytest.param(offset, dtype, id=f"{offset}-{str(dtype)[6:]}")
    for dtype in (torch.float32, torch.bfloat16)
    for offset in OFFSETS
] + [pytest.param("range60000", torch.float16, id="range60000-float16")]


def _base(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))


def _with_offset(x: torch.Tensor, offset: str) -> torch.Tensor:
    """``x`` with one channel far outside the float16 range (or two channels spanning ±60000)."""
    y = x.clone()
    if offset == "-70000":
        y[..., 5] -= 70000
    elif offset == "+1e6":
        y[..., 5] += 1e6
    else:  # per-token groups and the per-channel groups of channel 5 span -60000 .. 60000
        sign = torch.ones(T)
        sign[1::2] = -1
        y[..., 5] += 60000 * sign
        y[..., 6] -= 60000 * sign
    return y


def _norm(x: torch.Tensor, spec: QuantSpec, spread: bool = True) -> torch.Tensor:
    """Per element, what its group's error scales with: the group's range (asymmetric grids,
    ``spread``) or its absolute maximum (symmetric and FP8, or not ``spread``)."""
    g = grouped(x, spec)
    if spec.has_zero and spread:
        n = g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)
    else:
        n = g.abs().amax(-1, keepdim=True)
    out = torch.empty_like(x)
    grouped(out, spec).copy_(n.expand_as(g))
    return out


def _relative_error(x: torch.Tensor, xh: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (xh.float() - x).abs() / _norm(x, spec).clamp_min(1e-12)


@pytest.mark.parametrize(("offset", "dtype"), CASES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("kwargs", FORMATS)
def test_quantization_stays_finite_and_accurate(
    kwargs: dict, axis: str, offset: str, dtype: torch.dtype
) -> None:
    """Dequantized values are finite and their error, relative to the group's range (or absolute
    maximum), is that of in-range data, up to the resolution of the output dtype itself."""
    spec = QuantSpec(axis=axis, group_size=GROUP, **kwargs)
    base = _base()
    in_range = PackedTensor.from_float(base, spec)
    assert in_range.spec is spec  # nothing widened for in-range data
    r0 = _relative_error(base, in_range.dequantize(), spec).max()

    x = _with_offset(base, offset).to(dtype)
    packed = PackedTensor.from_float(x, spec)
    widened = packed.spec is not spec
    assert widened == metadata_overflows(x, spec)
    if x.float().abs().amax() <= safe_magnitude(spec):
        assert not widened
    if dtype == torch.float16:
        assert not widened  # float16 K/V always fit float16 metadata
    assert packed.metadata_finite
    assert {t.dtype for t in (packed.scale, packed.zero, packed.outlier_value) if t is not None} == {
        torch.float32 if widened else torch.float16
    }
    # bytes: what the tensors hold, and what the (widened) spec predicts
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in packed.tensors())
    assert packed.nbytes == B * T * packed.spec.bytes_per_token(H, D)

    xf = x.float()
    for out_dtype in (torch.float32, dtype):
        # the reference read (natively when the CPU kernels are built) into the model's dtype
        xh = dequantize_into(packed, torch.empty(x.shape, dtype=out_dtype))
        assert torch.isfinite(xh).all(), out_dtype
        resolution = 2 * torch.finfo(out_dtype).eps * _norm(xf, spec, spread=False)
        bound = 1.5 * r0 * _norm(xf, spec) + resolution + 1e-6
        err = (xh.float() - xf).abs()
        assert (err <= bound).all(), f"worst error / bound {(err / bound).max().item():.3f} ({out_dtype})"
        assert torch.equal(xh, packed.dequantize(dtype=out_dtype))  # native == reference, bit for bit


@pytest.mark.parametrize("kwargs", FORMATS)
def test_safe_magnitude_is_the_overflow_threshold(kwargs: dict) -> None:
    """K/V within `safe_magnitude` never overflow float16 metadata; groups just beyond it do."""
    for axis in ("token", "channel"):
        spec = QuantSpec(axis=axis, group_size=GROUP, **kwargs)
        limit = safe_magnitude(spec)
        noise = 1 + 1e-3 * _base().clamp(-3, 3)
        for sign in (1, -1):
            assert not metadata_overflows(sign * 0.99 * limit * noise, spec)
            assert metadata_overflows(sign * 1.02 * limit * noise, spec)


def test_symmetric_codes_into_float16_do_not_overflow_their_offset() -> None:
    """2-bit symmetric codes of a float16 group reaching 60000: ``-mid * scale`` is -120000, beyond
    float16, while every dequantized value fits; the reference and native reads stay finite."""
    spec = QuantSpec(bits=2, symmetric=True, group_size=GROUP)
    x = _with_offset(_base(), "range60000").half()
    packed = PackedTensor.from_float(x, spec)
    assert packed.spec is spec
    reference = packed.dequantize(dtype=torch.float16)
    native = dequantize_into(packed, torch.empty(x.shape, dtype=torch.float16))
    assert torch.isfinite(reference).all() and torch.equal(reference, native)
    # the same values as the float32 computation, rounded once
    assert torch.equal(reference, packed.dequantize(dtype=torch.float32).half())


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4, axis="channel", group_size=GROUP), QuantSpec(bits=2, format="nf", **OUTLIERS)],
    ids=["int4-channel", "nf2-outliers"],
)
def test_paged_store_widens_once_and_reports_its_bytes(spec: QuantSpec) -> None:
    """The first overflowing block switches the whole store to float32 metadata: earlier pages are
    converted exactly, one warning names the store, the magnitude and the dtype, and ``nbytes`` is
    what the pages hold."""
    store = PagedStore(spec, T, page_tokens=128, name="layer 3 keys")
    first = _base(1)
    store.append(first)
    before = store.dequantize_into(torch.empty(B, H, T, D))
    assert store.spec is spec and store.block_nbytes == B * store.num_tokens * spec.bytes_per_token(H, D)

    with pytest.warns(MetadataOverflowWarning, match=r"layer 3 keys: .*70\d\d\d.*float16") as record:
        store.append(_with_offset(_base(2), "-70000"))
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetadataOverflowWarning)  # once per store
        store.append(_with_offset(_base(3), "-70000"))
        store.append(_base(4))

    wide = store.spec
    assert wide.scale_dtype == "float32" and wide.bits == spec.bits and wide.axis is spec.axis
    assert all(p.spec is wide and p.scale.dtype == torch.float32 for p in store.pool.slabs)
    assert store.nbytes == sum(t.numel() * t.element_size() for t in store.tensors())
    assert store.block_nbytes == B * store.num_tokens * wide.bytes_per_token(H, D)
    out = store.dequantize_into(torch.empty(B, H, 4 * T, D))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, :T], before)  # converting float16 metadata to float32 is exact
    for i, block in enumerate((_with_offset(_base(2), "-70000"), _with_offset(_base(3), "-70000"), _base(4))):
        expected = PackedTensor.from_float(block, wide).dequantize()  # the blocks after: quantized wide
        assert torch.equal(out[:, :, (i + 1) * T : (i + 2) * T], expected)


# ------------------------------------------------------------------------- a model with a huge bias


def _tiny_llama(bias: float) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        attention_bias=True,
        rope_theta=1e6,  # Qwen2.5-like (whose k_proj biases are large)
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.k_proj.bias[31] = bias  # one channel of the first KV head
    return model


def _decode_logits(model: LlamaForCausalLM, cache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the teacher-forced decode steps after a prefill of ``prompt`` tokens."""
    with torch.no_grad():
        model(ids[:, :prompt], cache=cache, use_cache=True)
        steps = [
            model(ids[:, i : i + 1], cache=cache, use_cache=True).logits[:, -1]
            for i in range(prompt, ids.shape[1])
        ]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_llama_with_huge_key_bias_stays_finite_and_close(fused: bool) -> None:
    """fp32 tiny Llama, k_proj bias -70000 on one channel, ``k4v4``: the decode logits are finite
    and as close to an exact DynamicCache as without the bias."""
    ids = torch.randint(0, 256, (1, 330), generator=torch.Generator().manual_seed(0))
    prompt = 320  # 4 sinks + 128 residual: 3 packed blocks of 64 at the first decode step
    errors = {}
    for bias in (0.0, -70000.0):
        model = _tiny_llama(bias)
        if fused:
            register()
            model.set_attn_implementation("kvsqueeze")
        exact = _decode_logits(model, DynamicCache(config=model.config), ids, prompt)
        with warnings.catch_warnings(record=True) as predicted:
            warnings.simplefilter("always")
            cache = SqueezedCache.from_model(model, "k4v4")  # the risk check names the overflow
        assert cache.fused == fused
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            logits = _decode_logits(model, cache, ids, prompt)
        named = [w for w in predicted if issubclass(w.category, MetadataOverflowWarning)]
        assert len(named) == (1 if bias else 0)
        widened = [w for w in record if issubclass(w.category, MetadataOverflowWarning)]
        assert len(widened) == (2 if bias else 0)  # the keys of each layer, once
        assert torch.isfinite(logits).all()
        stores = [layer.store for layer in cache.layers]
        assert cache.nbytes() == store_tensor_bytes(stores)
        if bias:
            assert all(s.packed_k.spec.scale_dtype == "float32" for s in stores)
            assert all(s.packed_v.spec.scale_dtype == "float16" for s in stores)
        errors[bias] = (logits - exact).abs().max().item()
    assert errors[-70000.0] <= 3 * errors[0.0] + 1e-3, errors
