"""The vLLM plugin skeleton (plugins/vllm-kvsqueeze), on CPU without vLLM: page bytes equal to
kvsqueeze's own block bytes (a real `BlockPool` and `CacheConfig.bytes_per_token`), regions that
tile the page, the exact staging beside it, refusals of what a page cannot express, and the
``vllm.general_plugins`` registration against a stand-in of vLLM's dtype hook."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest
import torch

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "vllm-kvsqueeze"
sys.path.insert(0, str(PLUGIN / "src"))

from vllm_kvsqueeze.layout import PageLayout  # noqa: E402
from vllm_kvsqueeze.plugin import DTYPE_PREFIX, mappable_presets, register  # noqa: E402

from kvsqueeze.config import PRESETS, CacheConfig, QuantSpec, resolve_config  # noqa: E402
from kvsqueeze.storage.block_pool import BlockPool  # noqa: E402

SHAPES = [(2, 64), (3, 64), (8, 128)]  # (kv_heads, head_size): tiny, SmolLM2-135M, Llama-3-8B


def pool_block_bytes(spec: QuantSpec, heads: int, head_size: int, block_size: int) -> int:
    """The bytes of one block of kvsqueeze's pool, after a real write."""
    pool = BlockPool(spec, block_size, per_slab=4)
    x = torch.randn(1, heads, block_size, head_size)
    ids = pool.allocate(1, like=x)
    pool.write(ids, pool.encode(x))
    assert pool.nbytes == sum(t.numel() * t.element_size() for t in pool.tensors())  # spec bytes = tensors
    return pool.block_nbytes


def test_the_mappable_presets_are_the_plain_ones():
    names = set(mappable_presets())
    assert {"k4v4", "int8", "fp8", "k2v2"} <= names
    assert not names & {
        "none",
        "best-2bit",
        "best-3bit",
        "best-4bit",
    }  # exact; codebooks, outliers, transforms


@pytest.mark.parametrize("preset", sorted(mappable_presets()))
@pytest.mark.parametrize(("heads", "head_size"), SHAPES)
def test_page_bytes_are_kvsqueezes_block_bytes(preset, heads, head_size):
    config = PRESETS[preset].for_head_dim(head_size)
    layout = PageLayout.from_config(PRESETS[preset], heads, head_size)
    key = pool_block_bytes(config.key, heads, head_size, config.block_size)
    value = pool_block_bytes(config.value, heads, head_size, config.block_size)
    assert layout.kind_bytes("key") == key and layout.kind_bytes("value") == value
    assert layout.page_size_bytes == key + value
    layers = 30
    per_token = config.bytes_per_token(layers, heads, head_size)  # the capacity formula's packed bytes
    assert layers * layout.page_size_bytes == pytest.approx(config.block_size * per_token, abs=1e-6)
    assert layout.kv_cache_shape(7) == (7, layout.page_size_bytes)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, axis="channel", group_size=32),
        QuantSpec(bits=4, axis="token", group_size=32, symmetric=True),
        QuantSpec(bits=8, format="fp8_e4m3", group_size=64),
        QuantSpec(bits=2, axis="token", group_size=64, scale_dtype="float32"),
        QuantSpec(bits=4, axis="channel", group_size=64, outlier_fraction=0.01, outlier_tokens=32),
    ],
    ids=["int3-channel", "int4-sym", "fp8", "int2-fp32-scales", "int4-outliers"],
)
def test_other_specs_agree_with_the_pool(spec):
    heads, head_size, block = 2, 64, 64
    layout = PageLayout(spec, spec, heads, head_size, block)
    assert layout.kind_bytes("key") == pool_block_bytes(spec, heads, head_size, block)
    assert layout.kind_bytes("key") == round(block * spec.bytes_per_token(heads, head_size))


@pytest.mark.parametrize("align", [1, 16, 256])
def test_regions_tile_the_page_in_order_and_aligned(align):
    layout = PageLayout.from_config(PRESETS["k4v4"], 3, 64, align=align)
    regions = layout.regions
    assert [r.name for r in regions] == ["key.codes", "key.scales", "key.zeros", "value.codes", "value.scales",
                                         "value.zeros"]  # fmt: skip
    assert regions[0].offset == 0
    for before, after in zip(regions, regions[1:], strict=False):
        assert after.offset >= before.offset + before.nbytes and after.offset % align == 0
        assert after.offset - (before.offset + before.nbytes) < align  # padding only
    assert (
        layout.page_size_bytes % align == 0
        and layout.page_size_bytes >= regions[-1].offset + regions[-1].nbytes
    )
    # k4v4 on 3 heads x 64: codes 3*64*64/2 = 6144 bytes; 64 groups per head of fp16 scale and zero point
    assert regions[0].nbytes == 6144 and regions[1].nbytes == regions[2].nbytes == 3 * 64 * 2


def test_staging_is_sinks_window_and_one_block_exact():
    config = PRESETS["k4v4"]
    layout = PageLayout.from_config(config, 3, 64)
    assert layout.staging_tokens() == config.sink_tokens + config.residual_window + config.block_size
    assert (
        layout.staging_bytes(num_seqs=8, num_layers=30) == 8 * 30 * layout.staging_tokens() * 2 * 3 * 64 * 2
    )
    assert 3 < layout.compression() < 4  # 4-bit codes + fp16 scale/zero per 64 elements: 3.56x


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (resolve_config("text-centric"), "['tokens']"),
        (CacheConfig(rotate_keys=True), "['rotate_keys']"),
        (CacheConfig(pre_rope_keys=True), "['pre_rope_keys']"),
        (CacheConfig(key=None), "key: exact (None)"),
    ],
)
def test_what_a_page_cannot_express_is_refused(config, needle):
    with pytest.raises(ValueError) as err:
        PageLayout.from_config(config, 2, 64)
    assert needle in str(err.value)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="block_size: 0"):
        PageLayout(QuantSpec(), QuantSpec(), 2, 64, 0)
    with pytest.raises(ValueError, match="group_size: 64 does not divide block_size 32"):
        PageLayout(QuantSpec(axis="channel", group_size=64), QuantSpec(), 2, 64, 32)


# ---- registration ----------------------------------------------------------------------------------


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"kvsqueeze": "vllm_kvsqueeze.plugin:register"}
    assert "vllm" not in " ".join(project["dependencies"])  # vLLM hosts the plugin


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for the parts of vLLM `register` touches: ``vllm.config.kv_cache_dtype`` (the dtype
    hook) and ``vllm.v1.kv_cache_interface.KVQuantMode``; returns the registry it fills."""
    registry: dict[str, object] = {}
    calls: list[str] = []

    def register_kv_cache_dtype(name):
        def decorate(cls):
            calls.append(name)
            registry[name] = cls()
            return cls

        return decorate

    class KVQuantMode(enum.IntEnum):
        NONE = 0
        BACKEND = 9

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.config": types.ModuleType("vllm.config"),
        "vllm.config.kv_cache_dtype": types.ModuleType("vllm.config.kv_cache_dtype"),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.kv_cache_interface": types.ModuleType("vllm.v1.kv_cache_interface"),
    }
    modules["vllm.config.kv_cache_dtype"].register_kv_cache_dtype = register_kv_cache_dtype
    modules["vllm.config.kv_cache_dtype"].get_kv_cache_dtype_handler = registry.get
    modules["vllm.v1.kv_cache_interface"].KVQuantMode = KVQuantMode
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(registry=registry, calls=calls, modules=modules, mode=KVQuantMode)


def test_register_adds_one_dtype_per_mappable_preset_idempotently(fake_vllm):
    done = register()
    expected = {DTYPE_PREFIX + p.replace("-", "_") for p in mappable_presets()}
    assert set(done.dtypes) == expected == set(fake_vllm.registry)
    assert done.missing_hooks == () and done.attention_backend is False
    handler = fake_vllm.registry["kvsqueeze_k4v4"]
    assert handler.name == "kvsqueeze_k4v4" and handler.torch_dtype() is torch.uint8
    assert handler.is_quantized() and handler.quant_mode() is fake_vllm.mode.BACKEND
    assert handler.supports_platform(object()) is False  # no attention backend reads these pages yet
    calls = len(fake_vllm.calls)
    assert register() == done and len(fake_vllm.calls) == calls  # loaded again: nothing re-registered


def test_register_without_the_hook_registers_nothing_and_says_which(fake_vllm, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.config.kv_cache_dtype", None)
    done = register()
    assert done.dtypes == () and done.missing_hooks == ("vllm.config.kv_cache_dtype.register_kv_cache_dtype",)


def test_register_without_vllm_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match="install vllm first"):
        register()
