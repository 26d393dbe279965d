"""Held bytes follow the tokens: exact parts in 16 bits for a float32 model, buffers and pages
allocated as tokens arrive, nothing context-sized kept between forwards.

From 16 tokens on, a quantizing cache holds at most 1.05x the bytes of an fp16 cache of the same
tokens (before: 3.77x after 70 tokens, a float32 window allocated at its 128-token capacity).
"""

from __future__ import annotations

import pytest
import torch
from held import reachable_tensor_bytes
from tiny import tiny_llama
from transformers import DynamicCache, LlamaForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.config import preset
from kvsqueeze.eval.memory import store_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return tiny_llama(dtype=dtype, max_position_embeddings=4096)


def held(model: torch.nn.Module, name: str, prompt: int, decode: int = 0) -> SqueezedCache:
    cache = SqueezedCache.from_model(model, name)
    g = torch.Generator().manual_seed(prompt)
    with torch.no_grad():
        out = model(torch.randint(1, 128, (1, prompt), generator=g), cache=cache)
        for _ in range(decode):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    stores = [layer.store for layer in cache.layers]
    assert cache.nbytes() == store_tensor_bytes(stores)  # reported bytes are the bytes held
    assert cache.nbytes() == reachable_tensor_bytes(cache)  # and nothing else is
    return cache


@pytest.mark.parametrize("name", ["k4v4", "k4v2", "k2v2", "int8", "fp8"])
@pytest.mark.parametrize(
    "prompt, decode", [(16, 0), (17, 0), (12, 20), (70, 0), (131, 1), (133, 0), (200, 5), (700, 3)]
)
def test_held_bytes_at_most_fp16_from_16_tokens_on(name: str, prompt: int, decode: int) -> None:
    report = held(tiny(), name, prompt, decode).memory_report()
    assert report.num_tokens == prompt + decode
    assert report.ratio_to_fp16 <= 1.05, report
    assert report.exact_dtype == "float16"
    assert report.tokens["sinks"] + report.tokens["window"] + report.tokens["packed"] == prompt + decode


def test_report_says_which_tokens_are_exact_and_why() -> None:
    report = held(tiny(), "k4v4", 300).memory_report()
    assert report.describe() == "4 sinks + 40 in the residual window exact (float16), 256 packed"
    short = held(tiny(), "k4v4", 60).memory_report()
    assert "none packed yet" in short.describe()
    exact = held(tiny(), "none", 300).memory_report()  # nothing is quantized: not called "packed"
    assert exact.describe() == "all exact (float32): 0 sinks, 256 in blocks, 44 waiting for a full block"
    policy = held(tiny(), "knorm-50", 300).memory_report()  # token policies list their classes
    t = policy.tokens
    assert (
        t["sinks"] + t["window"] + t["exact"] + t["high"] + t["low"] + t["evicted"] == 300
        and t["evicted"] > 0
    )
    assert policy.describe().startswith(f"4 sinks + {t['window']} in the residual window exact (float16)")
    assert f"{t['evicted']} evicted" in policy.describe()


def test_none_keeps_the_model_dtype_and_reproduces_dynamic_cache() -> None:
    model = tiny()
    cache = held(model, "none", 200)
    assert cache.memory_report().exact_dtype == "float32"
    ids = torch.randint(1, 128, (1, 50))
    with torch.no_grad():
        a = model(ids, cache=SqueezedCache.from_model(model, "none")).logits
        b = model(ids, cache=DynamicCache(config=model.config)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "exact_dtype, expected", [("model", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16")]
)
def test_exact_dtype_can_be_chosen(exact_dtype: str, expected: str) -> None:
    config = preset("k4v4").replace(exact_dtype=exact_dtype)
    cache = held(tiny(), config, 150)
    assert cache.memory_report().exact_dtype == expected
    assert cache.layers[0].store.window_k.data.dtype == getattr(torch, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_models_keep_their_dtype(dtype: torch.dtype) -> None:
    cache = held(tiny(dtype), "k4v4", 150)
    assert cache.memory_report().exact_dtype == str(dtype).removeprefix("torch.")


def test_exact_values_beyond_float16_keep_the_model_dtype() -> None:
    cache = SqueezedCache.from_model(tiny(), "k4v4")
    key, value = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    key[0, 0, 3, 5] = -70000.0
    with pytest.warns(
        RuntimeWarning, match=r"exceed torch.float16 .* keeps its exact tokens in torch.float32"
    ):
        cache.update(key, value, 0)
    store = cache.layers[0].store
    assert store.exact_dtype == torch.float32 and store.sink_k.view()[0, 0, 3, 5] == -70000.0


def test_nothing_context_sized_outlives_a_forward() -> None:
    cache = held(tiny(), "k4v4", 1000, 2)
    assert cache.workspace.nbytes == 0
    assert cache.memory_report().total_bytes == cache.nbytes()


def test_exact_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match=r"exact_dtype: 'float8' is unknown; allowed: \['auto', 'model'"):
        preset("k4v4").replace(exact_dtype="float8")


@pytest.mark.parametrize("first", [torch.float16, torch.bfloat16])
def test_exact_pages_widen_with_their_tokens_never_narrow(first: torch.dtype) -> None:
    from kvsqueeze.storage.pages import PagedStore

    store = PagedStore(None, 16, 32)  # an exact class of a token-policy store
    store.append(torch.ones(1, 1, 16, 4, dtype=first))
    store.append(torch.full((1, 1, 16, 4), 70000.0))  # the store widened its exact dtype to float32
    slab = store.pool.slabs[0].values  # (blocks, heads, 16, 4)
    assert slab.dtype == torch.float32
    assert slab[1, 0, -1, 0] == 70000.0 and slab[0, 0, 0, 0] == 1.0
    store.append(torch.ones(1, 1, 16, 4, dtype=first))  # a narrower token does not narrow the blocks
    assert all(s.values.dtype == torch.float32 for s in store.pool.slabs)
    assert store.block_nbytes == 48 * 4 * 4


def test_transform_constants_are_counted_once() -> None:
    """Rotation matrices and RoPE frequencies (best-*: rotated values, pre-RoPE keys) are held by the
    cache: counted once in nbytes (the walk in `held` checks it) and reported as their own part."""
    cache = held(tiny(), "best-3bit", 300)
    report = cache.memory_report()
    assert report.parts["transform_constants"] == cache.constants_nbytes() == 64 * 64 * 4 + 32 * 4
    assert report.total_bytes == cache.nbytes()
    assert "transform_constants" not in held(tiny(), "k4v4", 300).memory_report().parts
