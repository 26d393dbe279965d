"""Tests for the low-bit components: rotation, pre-RoPE keys, codebooks, outliers, calibration, risk.

Synthetic tensors for the pure parts (exact properties), a tiny random Llama for the cache paths
(pre-RoPE and rotated caches at 8 bits must match the plain cache within the int8 tolerance).
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvsqueeze.calibration.allocation import allocate, with_bits
from kvsqueeze.calibration.risk import ChannelProfile, check_config, predicted_error, profiles_from_weights
from kvsqueeze.config import PRESETS, CacheConfig, LayerOverride, QuantSpec
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.quant import PackedTensor
from kvsqueeze.quant.codebook import lloyd_max, normal_float
from kvsqueeze.quant.packing import pack, unpack
from kvsqueeze.quant.primitives import choose_qparams, dequantize, quantize
from kvsqueeze.quant.rope import Rope
from kvsqueeze.quant.rotation import rotation_matrix, sylvester_hadamard
from kvsqueeze.storage.transform import PageTransform

B, H, T, D = 2, 3, 128, 64


def _data(seed: int = 0) -> torch.Tensor:
    x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 15  # an outlier channel
    x[..., 9] += 4
    return x


# ------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("size", [64, 128, 96, 80])
def test_rotation_is_exactly_orthogonal(size: int) -> None:
    q = rotation_matrix(size, seed=3).double()
    assert torch.allclose(q @ q.T, torch.eye(size, dtype=torch.float64), atol=1e-6)
    assert torch.equal(rotation_matrix(size, seed=3), rotation_matrix(size, seed=3))
    if size & (size - 1) == 0:  # randomized Hadamard: every entry is +-1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full_like(q, size**-0.5), atol=1e-7)
        h = sylvester_hadamard(size)
        assert torch.equal(h @ h.T, size * torch.eye(size, dtype=torch.float64))
    assert not torch.equal(rotation_matrix(size, 0), rotation_matrix(size, 1))


def test_rotation_keeps_scores_and_spreads_outliers() -> None:
    x, q = _data(), rotation_matrix(D)
    y = x @ q
    assert torch.allclose(y @ y.transpose(-1, -2), x @ x.transpose(-1, -2), rtol=1e-4, atol=1e-2)
    t = PageTransform(rotation=q)
    assert torch.allclose(t.decode_(t.encode(x, 0).clone(), 0), x, atol=1e-5)
    # per-token range of a rotated tensor is much smaller than with the outlier channel
    assert (y.amax(-1) - y.amin(-1)).mean() < 0.6 * (x.amax(-1) - x.amin(-1)).mean()


# ----------------------------------------------------------------------------------------- RoPE


def test_rope_matches_transformers_and_inverts() -> None:
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    rot = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 2, 40, 64)
    pos = torch.arange(7, 47)[None]
    cos, sin = rot(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    rope = Rope.default(64, 10000.0)
    assert torch.allclose(rope.apply(x, 7), want, atol=1e-5)
    assert torch.allclose(rope.apply(rope.apply(x, 7), 7, inverse=True), x, atol=1e-5)
    t = PageTransform(rope=rope, position_offset=4, rotation=rotation_matrix(64))
    assert torch.allclose(t.decode_(t.encode(want, 3).clone(), 3), want, atol=1e-5)


# ------------------------------------------------------------------------------------ codebooks


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_float_codebook(bits: int) -> None:
    levels = normal_float(bits)
    assert len(levels) == 2**bits and levels[0] == -1 and levels[-1] == 1
    assert all(b > a for a, b in zip(levels, levels[1:], strict=False))
    assert levels == tuple(-v for v in reversed(levels))  # symmetric


def test_lloyd_max_fits_better_than_fixed() -> None:
    samples = torch.randn(50_000, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) / 3
    fitted = lloyd_max(samples, 3)

    def mse(levels: tuple[float, ...]) -> float:
        lv = torch.tensor(levels)
        return (samples[:, None] - lv).abs().min(-1).values.pow(2).mean().item()

    assert mse(fitted) < mse(normal_float(3)) and mse(fitted) < mse(tuple(torch.linspace(-1, 1, 8).tolist()))
    QuantSpec(bits=3, format="nf", codebook=fitted)  # a valid codebook


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codebook_codes_pack_and_dequantize(bits: int, axis: str, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, axis=axis, group_size=64, format="nf", symmetric=symmetric)
    x = _data()
    scale, zero = choose_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    assert codes.max() < 2**bits
    assert torch.equal(unpack(pack(codes, bits), bits), codes)  # packing inverses
    back = dequantize(codes, scale, zero, spec)
    page = PackedTensor.from_float(x, spec)
    assert torch.equal(page.dequantize(), back)
    # error at most half the widest gap between levels, times the group scale
    gap = max(b - a for a, b in zip(spec.levels, spec.levels[1:], strict=False)) / 2
    s = scale.float().repeat_interleave(64, -1 if axis == "token" else -2)
    assert ((back - x).abs() <= gap * s * 1.001 + 1e-4).all()


def test_codebook_validation() -> None:
    with pytest.raises(ValueError, match="codebook: 3 levels"):
        QuantSpec(bits=2, format="nf", codebook=(-1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="codebook: given for format 'int'"):
        QuantSpec(bits=2, codebook=(-1.0, 0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        QuantSpec(bits=2, format="nf", codebook=(-1.0, 0.5, 0.0, 1.0))
    with pytest.raises(ValueError, match="bits: 8 is not supported for nf"):
        QuantSpec(bits=8, format="nf")
    spec = QuantSpec(bits=2, format="nf", codebook=[-1, -0.2, 0.3, 1])
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ------------------------------------------------------------------------------------- outliers


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_outliers_are_kept_exact_and_counted(axis: str) -> None:
    spec = QuantSpec(bits=2, axis=axis, group_size=64, outlier_fraction=0.01, outlier_tokens=64)
    x = _data()
    x[0, 1, 17, 33] = 250.0  # a spike
    page = PackedTensor.from_float(x, spec)
    count = spec.outlier_count(D)
    assert count == 41 and page.outlier_index.shape == (B, H, T // 64, count)
    back = page.dequantize()
    assert back[0, 1, 17, 33] == 250.0  # restored exactly (fp16 holds it)
    plain = PackedTensor.from_float(x, QuantSpec(bits=2, axis=axis, group_size=64)).dequantize()
    assert (back - x).pow(2).mean() < (plain - x).pow(2).mean()
    near = (slice(0, 1), slice(1, 2), slice(0, 64), slice(32, 34)) if axis == "channel" else (0, 1, 17)
    assert (back - x)[near].abs().max() < 0.2 * (plain - x)[near].abs().max()  # the spike's group
    # bytes held == bytes predicted (side store included)
    assert page.nbytes == round(spec.bytes_per_token(H, D) * B * T)
    assert page.nbytes - PackedTensor.from_float(x, QuantSpec(bits=2, axis=axis, group_size=64)).nbytes == (
        B * H * (T // 64) * count * 4
    )
    # slices and copies keep the side store aligned
    store = PackedTensor.empty(B, H, 256, D, spec, x.device)
    store.slice_tokens(64, 192).copy_(page)
    assert torch.equal(store.slice_tokens(64, 192).dequantize(), back)


def test_outlier_validation() -> None:
    with pytest.raises(ValueError, match="outlier_fraction"):
        QuantSpec(outlier_fraction=0.5)
    with pytest.raises(ValueError, match="outlier_tokens: 64 does not divide block_size 32"):
        CacheConfig(
            key=QuantSpec(bits=2, axis="channel", group_size=32, outlier_fraction=0.01),
            block_size=32,
            residual_window=128,
        )


# --------------------------------------------------------------------------- caches on a tiny model


@functools.cache
def tiny() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def logits(config, chunks=(150, 40, 1, 1, 70)) -> torch.Tensor:
    model = tiny()
    tokens = torch.randint(1, 256, (1, sum(chunks)), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config) if config is None else SqueezedCache.from_model(model, config)
    out, pos = [], 0
    for n in chunks:
        out.append(model(tokens[:, pos : pos + n], cache=cache, use_cache=True).logits)
        pos += n
    return torch.cat(out, 1)


INT8 = dict(
    key=QuantSpec(bits=8, axis="channel", group_size=32), value=QuantSpec(bits=8, axis="token", group_size=64),
    sink_tokens=2, residual_window=32, block_size=32, page_tokens=64,
)  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {"pre_rope_keys": True},
        {"rotate_values": True},
        {"rotate_keys": True, "pre_rope_keys": True, "rotate_values": True},
    ],
)
def test_transformed_cache_matches_plain_at_8_bits(changes: dict) -> None:
    exact = logits(None)
    plain = logits(CacheConfig(**INT8))
    got = logits(CacheConfig(**INT8, **changes))
    scale = exact.abs().max()
    assert (plain - exact).abs().max() / scale < 2e-2
    assert (got - exact).abs().max() / scale < 2e-2
    assert (got - plain).abs().max() / scale < 2e-2


def test_pre_rope_with_exact_specs_is_exact_and_transforms_are_used() -> None:
    cfg = CacheConfig(**INT8, pre_rope_keys=True, rotate_values=True)
    cache = SqueezedCache.from_model(tiny(), cfg)
    layer = cache.layers[0]
    assert (
        layer.store.packed_k.transform.rope is not None
        and layer.store.packed_v.transform.rotation is not None
    )
    assert not cache.fused and cfg.kernel_readable  # an sdpa model: the reference path by choice


def test_best_presets_within_budget_and_read_fused() -> None:
    for name, limit in (("best-4bit", 4.6), ("best-3bit", 3.6), ("best-2bit", 2.8)):
        cfg = PRESETS[name]
        assert cfg.bits_per_element() <= limit, name
        assert 8 * cfg.bytes_per_token(1, 3, 64) / (2 * 3 * 64) <= limit, name  # whole outlier entries
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # issue 16: the fused kernels read them, no fallback
        cache = SqueezedCache.from_model(model, "best-3bit", fused=True)
    assert cache.fused


def test_pre_rope_falls_back_cleanly_without_standard_rope() -> None:
    config = tiny().config.__class__(
        **{
            **tiny().config.to_dict(),
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        }
    )
    with pytest.warns(UserWarning, match="pre_rope_keys: falling back"):
        cache = SqueezedCache(CacheConfig(**INT8, pre_rope_keys=True), config)
    assert cache.rope is None and cache.layers[0].store.packed_k.transform is None


def test_layer_overrides_and_calibration_file_round_trip(tmp_path) -> None:
    low = QuantSpec(bits=2, axis="channel", group_size=32, format="nf", codebook=(-1.0, -0.25, 0.3, 1.0))
    cfg = CacheConfig(**INT8, pre_rope_keys=True, layer_overrides=(LayerOverride(1, low, None),))
    assert cfg.for_layer(1).key == low and cfg.for_layer(1).value is None and cfg.for_layer(0).key == cfg.key
    assert cfg.bits_per_element(num_layers=2) == pytest.approx((9.0 + 8.5 + 3.0 + 16) / 4)  # g32 keys: 9 b/el
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"config": cfg.to_dict(), "calibration": {"tokens": [100, 200]}}))
    assert CacheConfig.load(path) == cfg
    cache = SqueezedCache.from_model(tiny(), CacheConfig.load(path))
    assert cache.layers[1].config.key == low
    with pytest.raises(ValueError, match="layer_overrides: layers \\[5\\]"):
        SqueezedCache.from_model(tiny(), cfg.replace(layer_overrides=(LayerOverride(5, low, low),)))
    logits(cfg)  # runs end to end


def test_allocation_spends_the_budget_where_it_helps() -> None:
    sens = {
        "key": {0: {2: 1.0, 4: 0.0}, 1: {2: 0.01, 4: 0.0}},
        "value": {0: {2: 0.02, 4: 0.0}, 1: {2: 0.5, 4: 0.0}},
    }
    base = {
        "key": QuantSpec(bits=4, axis="channel", group_size=64),
        "value": QuantSpec(bits=4, group_size=64),
    }

    def spec_for(kind: str, layer: int, bits: int) -> QuantSpec:
        return with_bits(base[kind], bits)

    choice = allocate(sens, spec_for, target_bits=3.5)  # room for two of four upgrades
    assert choice == {("key", 0): 4, ("key", 1): 2, ("value", 0): 2, ("value", 1): 4}


def test_risk_check_flags_bias_outliers_for_per_token_keys() -> None:
    std = torch.ones(2, 64)
    mean = torch.zeros(2, 64)
    mean[:, 3] = 200.0  # a Qwen2.5-like key bias channel
    prof = ChannelProfile(std, mean)
    per_token = QuantSpec(bits=4, axis="token", group_size=64)
    per_channel = QuantSpec(bits=4, axis="channel", group_size=64)
    assert predicted_error(prof, per_token, rotated=False) > 1.0
    assert predicted_error(prof, per_channel, rotated=False) < 0.2  # pre-RoPE: the offset is absorbed
    assert predicted_error(ChannelProfile(std, torch.zeros(2, 64)), per_token, rotated=False) < 0.3
    profiles = {0: (prof, ChannelProfile(std, torch.zeros(2, 64)))}
    bad = CacheConfig(key=per_token, value=QuantSpec(bits=4, group_size=64))
    assert check_config(profiles, bad, None) and not check_config(
        profiles, PRESETS["k4v4"].replace(pre_rope_keys=True), None
    )
    assert set(profiles_from_weights(tiny())) == {0, 1}
    for name in ("k4v4", "best-3bit"):
        assert not check_config(profiles_from_weights(tiny()), PRESETS[name], None)


def test_best_presets_use_the_bundled_calibration_of_the_embedded_model() -> None:
    smollm2 = LlamaConfig(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )  # fmt: skip
    for name, limit in (("best-4bit", 4.6), ("best-3bit", 3.6), ("best-2bit", 2.8)):
        cache = SqueezedCache(name, smollm2)
        cfg = cache.cache_config
        assert len(cfg.layer_overrides) == 30 and cfg != PRESETS[name]
        assert 8 * cfg.bytes_per_token(30, 3, 64) / (2 * 30 * 3 * 64) <= limit
        assert cache.layers[8].config == cfg.for_layer(8)
    assert SqueezedCache("best-3bit", tiny().config).cache_config == PRESETS["best-3bit"]  # no match: generic


def test_calibrate_end_to_end_on_a_tiny_model_round_trips(tmp_path) -> None:
    from kvsqueeze.calibration.run import calibrate, save

    ids = torch.randint(1, 256, (600,), generator=torch.Generator().manual_seed(2))
    base = CacheConfig(
        key=QuantSpec(bits=3, axis="channel", group_size=32),
        value=QuantSpec(bits=3, axis="token", group_size=64, format="nf", symmetric=True),
        block_size=32, pre_rope_keys=True, rotate_values=True,
    )  # fmt: skip
    data = calibrate(
        tiny(), ids, base, 3.0, (2, 4), num_tokens=256, prefill_tokens=64, score_tokens=16, log=lambda m: None
    )
    cal = data["calibration"]
    assert cal["tokens"] == [344, 600] and "last 256 tokens" in cal["slice"]
    assert set(cal["sensitivity"]) == {"key", "value"} and set(cal["sensitivity"]["key"]) == {"0", "1"}
    path = save(data, tmp_path / "c.json", "tiny", "random ids")
    cfg = CacheConfig.load(path)
    assert cfg.bits_per_element(num_layers=2) <= 3.0 + 1e-9 and len(cfg.layer_overrides) == 2
    assert all(o.value.codebook is not None for o in cfg.layer_overrides if o.value.bits <= 4)
    reused = calibrate(tiny(), ids, base, 4.0, (2, 4), 256, 64, 16, log=lambda m: None, reuse=cal)
    assert reused["calibration"]["sensitivity"] == cal["sensitivity"]
    logits(cfg, chunks=(100, 40, 1))  # the calibrated config runs
