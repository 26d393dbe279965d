"""Tests for `QuantSpec` / `CacheConfig`: analytic sizes, presets, validation messages."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kvsqueeze.config import PRESETS, CacheConfig, preset, resolve_config
from kvsqueeze.quant import PackedTensor, QuantSpec

# ------------------------------------------------------------------------------------------- sizes

SIZE_CASES = [
    # spec kwargs, bits per element (codes + fp16 scale [+ zero] per group)
    pytest.param(dict(bits=4, group_size=64), 4.5, id="int4-g64"),
    pytest.param(dict(bits=4, group_size=64, symmetric=True), 4.25, id="int4-g64-sym"),
    pytest.param(dict(bits=2, group_size=32), 3.0, id="int2-g32"),
    pytest.param(dict(bits=2, group_size=32, axis="channel"), 3.0, id="int2-g32-channel"),
    pytest.param(dict(bits=3, group_size=32), 4.0, id="int3-g32"),
    pytest.param(dict(bits=8, group_size=128), 8.25, id="int8-g128"),
    pytest.param(dict(bits=8, format="fp8_e4m3", group_size=64), 8.25, id="fp8-g64"),
    pytest.param(dict(bits=8, format="fp8_e5m2", group_size=16, symmetric=True), 9.0, id="fp8e5m2-g16"),
    pytest.param(dict(bits=4, group_size=64, scale_dtype="float32"), 5.0, id="int4-g64-fp32-scales"),
    pytest.param(dict(bits=2, group_size=16, scale_dtype="bfloat16"), 4.0, id="int2-g16-bf16-scales"),
]


@pytest.mark.parametrize(("kwargs", "bits_per_element"), SIZE_CASES)
def test_spec_sizes_are_analytic(kwargs: dict, bits_per_element: float) -> None:
    spec = QuantSpec(**kwargs)
    assert spec.bits_per_element == bits_per_element
    assert spec.bytes_per_token(8, 128) == 8 * 128 * bits_per_element / 8


@pytest.mark.parametrize(("kwargs", "bits_per_element"), SIZE_CASES)
@pytest.mark.parametrize("tokens", [128, 256])
def test_packed_tensor_nbytes(kwargs: dict, bits_per_element: float, tokens: int) -> None:
    """nbytes is what the tensors hold, and what the spec predicts: batch * tokens * per-token."""
    batch, heads, head_dim = 2, 3, 128
    spec = QuantSpec(**kwargs)
    x = torch.randn(batch, heads, tokens, head_dim, generator=torch.Generator().manual_seed(0))
    packed = PackedTensor.from_float(x, spec)
    held = sum(t.numel() * t.element_size() for t in packed.tensors())
    assert len(packed.tensors()) == (3 if spec.has_zero else 2)
    assert packed.nbytes == held
    assert packed.nbytes == batch * tokens * spec.bytes_per_token(heads, head_dim)
    assert packed.nbytes * 8 == batch * heads * tokens * head_dim * bits_per_element
    empty = PackedTensor.empty(batch, heads, tokens, head_dim, spec, torch.device("cpu"))
    assert empty.nbytes == packed.nbytes


def test_config_sizes() -> None:
    k4v2 = preset("k4v2")  # keys int4 g64 (4.5 bits), values int2 g32 (3.0 bits)
    assert k4v2.bits_per_element() == (4.5 + 3.0) / 2
    assert k4v2.bytes_per_token(num_layers=2, num_kv_heads=4, head_dim=64) == 2 * 4 * 64 * (4.5 + 3.0) / 8
    none = preset("none")
    assert none.bits_per_element() == 16
    assert none.bytes_per_token(2, 4, 64) == 2 * 2 * 4 * 64 * 2
    mixed = CacheConfig(value=None)  # exact values count exact_bytes per element
    assert mixed.bits_per_element(exact_bits=32) == (4.5 + 32) / 2
    assert mixed.bytes_per_token(1, 4, 64, exact_bytes=4) == 4 * 64 * 4.5 / 8 + 4 * 64 * 4


# ----------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips(name: str) -> None:
    config = preset(name)
    assert resolve_config(name) is config and resolve_config(config) is config
    data = config.to_dict()
    assert CacheConfig.from_dict(data) == config
    assert resolve_config(data) == config
    text = json.dumps(data)
    assert CacheConfig.from_dict(json.loads(text)) == config
    assert json.loads(text) == data  # plain JSON values only (no enums, no dtypes)
    for spec in (config.key, config.value):
        if spec is not None:
            assert QuantSpec.from_dict(spec.to_dict()) == spec
    # Every preset fits the usual head sizes and its own block layout.
    for head_dim in (64, 128):
        config.check_model(num_kv_heads=8, head_dim=head_dim)


def test_config_accepts_spec_dicts_and_replace() -> None:
    config = CacheConfig(key={"bits": 2, "axis": "channel", "group_size": 32}, value=None, block_size=32)
    assert config.key == QuantSpec(bits=2, axis="channel", group_size=32)
    assert not config.is_exact and preset("none").is_exact
    assert config.replace(sink_tokens=0).sink_tokens == 0
    with pytest.raises(ValueError, match="residual_window: 96"):
        preset("k4v4").replace(residual_window=96)


# -------------------------------------------------------------------------------------- validation

ERRORS = [
    # (id, callable, substrings the message must contain: the field and the bad value)
    ("bits-5", lambda: QuantSpec(bits=5), ["bits", "5", "(2, 3, 4, 8)"]),
    ("bits-float", lambda: QuantSpec(bits=4.0), ["bits", "4.0"]),
    ("fp8-bits-7", lambda: QuantSpec(bits=7, format="fp8_e4m3"), ["bits", "7", "fp8_e4m3", "(8,)"]),
    ("fp8-default-bits", lambda: QuantSpec(format="fp8_e5m2"), ["bits", "4", "fp8_e5m2"]),
    ("format-fp4", lambda: QuantSpec(format="fp4"), ["format", "'fp4'", "fp8_e4m3"]),
    ("axis-row", lambda: QuantSpec(axis="row"), ["axis", "'row'", "'token'", "'channel'"]),
    ("group-0", lambda: QuantSpec(group_size=0), ["group_size", "0"]),
    ("group-neg", lambda: QuantSpec(group_size=-8), ["group_size", "-8"]),
    ("scale-dtype", lambda: QuantSpec(scale_dtype="float64"), ["scale_dtype", "'float64'", "float16"]),
    ("spec-unknown-key", lambda: QuantSpec.from_dict({"bits": 4, "groups": 2}), ["'groups'", "group_size"]),
    (
        "head-dim-group",
        lambda: QuantSpec(group_size=48).check_head_dim(64),
        ["group_size", "48", "head_dim 64", "32"],
    ),
    (
        "head-dim-packing",
        lambda: QuantSpec(bits=3, group_size=4).check_head_dim(36),
        ["head_dim", "36", "3 bits", "multiple of 8"],
    ),
    (
        "model-key-group",
        lambda: CacheConfig(key=QuantSpec(axis="token", group_size=48), block_size=64).check_model(8, 64),
        ["key.group_size", "48", "head_dim 64"],
    ),
    (
        "model-value-group",
        lambda: CacheConfig(value=QuantSpec(group_size=128)).check_model(8, 64),
        ["value.group_size", "128", "head_dim 64"],
    ),
    (
        "channel-group-block",
        lambda: CacheConfig(key=QuantSpec(axis="channel", group_size=48), block_size=64),
        ["key.group_size", "48", "block_size 64"],
    ),
    (
        "channel-group-larger-than-block",
        lambda: CacheConfig(key=None, value=QuantSpec(axis="channel", group_size=64), block_size=32),
        ["value.group_size", "64", "block_size 32"],
    ),
    (
        "window-not-multiple",
        lambda: CacheConfig(residual_window=100, block_size=64),
        ["residual_window", "100", "block_size 64"],
    ),
    ("block-0", lambda: CacheConfig(block_size=0), ["block_size", "0"]),
    ("page-not-multiple", lambda: CacheConfig(page_tokens=100), ["page_tokens", "100", "block_size 64"]),
    ("sinks-negative", lambda: CacheConfig(sink_tokens=-1), ["sink_tokens", "-1"]),
    ("window-negative", lambda: CacheConfig(residual_window=-64), ["residual_window", "-64"]),
    ("key-type", lambda: CacheConfig(key="int4"), ["key", "'int4'"]),
    ("config-unknown-key", lambda: CacheConfig.from_dict({"window": 64}), ["'window'", "residual_window"]),
    (
        "config-unknown-spec-key",
        lambda: CacheConfig.from_dict({"key": {"bits": 4, "nbits": 4}}),
        ["'nbits'", "QuantSpec"],
    ),
    ("resolve-type", lambda: resolve_config(42), ["config", "42"]),
    (
        "read-path-unknown",
        lambda: preset("k4v4").check_read_path("eager", "--attn", "k4v4"),
        ["--attn", "'eager'", "'reference'", "'fused'"],
    ),
    (
        "read-path-reference-attention-scores",
        lambda: preset("h2o-50").check_read_path("reference", "--attn", "--kv h2o-50"),
        ["--attn", "'reference'", "h2o-50", "attention", "['fused']"],
    ),
]


@pytest.mark.parametrize(("make", "fragments"), [pytest.param(m, f, id=i) for i, m, f in ERRORS])
def test_bad_input_names_field_and_value(make, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("name", "paths"),
    [("k4v4", ("reference", "fused")), ("none", ("reference", "fused")), ("best-2bit", ("reference", "fused")),
     ("h2o-50", ("fused",)), ("knorm-50", ("reference", "fused"))],
)  # fmt: skip
def test_read_paths(name: str, paths: tuple[str, ...]) -> None:
    assert preset(name).read_paths == paths
    for path in paths:
        preset(name).check_read_path(path, "--attn", name)


@pytest.mark.parametrize("lookup", [preset, resolve_config])
def test_unknown_preset_lists_allowed(lookup) -> None:
    with pytest.raises(ValueError, match=re.escape("'k3v3'")) as info:
        lookup("k3v3")
    message = str(info.value)
    assert "preset" in message
    assert all(repr(name) in message for name in PRESETS)


def test_valid_edge_values() -> None:
    """Boundaries that must stay accepted: zero sinks and window, per-channel group == block."""
    config = CacheConfig(
        key=QuantSpec(axis="channel", group_size=32), sink_tokens=0, residual_window=0, block_size=32
    )
    assert config.page_tokens % config.block_size == 0
    QuantSpec(bits=3, group_size=8).check_head_dim(8)
    QuantSpec(bits=2, axis="channel", group_size=128).check_head_dim(4)  # per-channel: any group
    QuantSpec(axis="channel", group_size=16).check_block_size(64)
    QuantSpec(axis="token", group_size=48).check_block_size(64)  # per-token groups ignore blocks
