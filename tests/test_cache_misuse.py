"""Direct misuse of a SqueezedCache fails early with a message naming what is wrong (nothing stored)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import LlamaForCausalLM

from kvsqueeze import SqueezedCache

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(head_dim: int = 64, kv_heads: int = 2, layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(head_dim=head_dim, num_key_value_heads=kv_heads, num_hidden_layers=layers)


def kv(batch: int = 1, heads: int = 2, n: int = 3, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)


def lengths(cache: SqueezedCache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


@pytest.mark.parametrize("preset", ["k4v4", "none", "int8"])
@pytest.mark.parametrize(
    "states, match",
    [
        (kv(dim=32), r"key_states of shape \(1, 2, 3, 32\).*allowed: \(batch, 2, tokens, 64\)"),
        (kv(dim=128), r"key_states of shape \(1, 2, 3, 128\)"),
        (kv(heads=3), r"key_states of shape \(1, 3, 3, 64\).*2 KV heads"),
        (kv(heads=1), r"key_states of shape \(1, 1, 3, 64\)"),
        ((torch.randn(2, 3, 64), torch.randn(2, 3, 64)), r"key_states of shape \(2, 3, 64\)"),
        ((kv()[0], torch.randn(1, 2, 4, 64)), r"value_states .* do not match"),
    ],
)
def test_update_with_another_shape_is_refused(preset: str, states: tuple, match: str) -> None:
    cache = SqueezedCache.from_model(tiny(), preset)
    with pytest.raises(ValueError, match=match):
        cache.update(*states, 0)
    assert lengths(cache) == [0, 0]


@pytest.mark.parametrize("layer_idx", [2, 5, -1, 1.0])
def test_layer_idx_out_of_range_is_refused(layer_idx: object) -> None:
    cache = SqueezedCache.from_model(tiny(), "k4v4")
    with pytest.raises(ValueError, match=r"layer_idx: .*allowed: 0 to 1"):
        cache.update(*kv(), layer_idx)


@pytest.mark.parametrize("new_batch", [2, 3])
def test_batch_size_change_is_refused(new_batch: int) -> None:
    model = tiny()
    cache = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 20)), cache=cache)
        with pytest.raises(ValueError, match=rf"batch size {new_batch} for layer 0, which holds 1 sequences"):
            model(torch.randint(1, 128, (new_batch, 5)), cache=cache)
    assert lengths(cache) == [20, 20]


@pytest.mark.parametrize("preset", ["k4v4", "none"])
def test_reuse_for_a_new_prompt_without_reset_is_refused(preset: str) -> None:
    model = tiny()
    cache = SqueezedCache.from_model(model, preset)
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 50)), cache=cache, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match=r"start at position 22, but this cache already holds 52 tokens"):
            model.generate(torch.randint(1, 128, (1, 30)), cache=cache, max_new_tokens=3, do_sample=False)
        cache.reset()
        model.generate(torch.randint(1, 128, (1, 30)), cache=cache, max_new_tokens=3, do_sample=False)
    assert lengths(cache) == [32, 32]


@pytest.mark.parametrize("prompt", [1, 20, 30, 52])
def test_reuse_for_a_prompt_not_longer_than_the_cache_is_refused_clearly(prompt: int) -> None:
    """generate treats the held tokens as the prompt's start: a prompt no longer than them leaves no
    new token (transformers then fails reshaping an empty tensor) or starts before them."""
    model = tiny()
    cache = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 50)), cache=cache, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match=r"call cache.reset\(\)"):
            model.generate(torch.randint(1, 128, (1, prompt)), cache=cache, max_new_tokens=3, do_sample=False)
    assert lengths(cache) == [52, 52]


def test_a_cache_of_another_model_is_refused() -> None:
    cache = SqueezedCache.from_model(tiny(), "k4v4")
    other = tiny(head_dim=32)
    with torch.no_grad(), pytest.raises(ValueError, match="built for a model with 2 KV heads of head_dim 64"):
        other(torch.randint(1, 128, (1, 5)), cache=cache)
    deeper = tiny(layers=3)
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer_idx: 2; allowed: 0 to 1"):
        deeper(torch.randint(1, 128, (1, 5)), cache=cache)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("preset", ["k4v4", "int8", "k2v2"])
def test_non_finite_keys_or_values_are_refused_before_quantizing(bad: float, preset: str) -> None:
    cache = SqueezedCache.from_model(tiny(), preset)
    key, value = kv(n=200)
    value[0, 1, 7, 3] = bad
    with pytest.raises(
        ValueError, match=r"1 non-finite \(NaN/inf\) values in the new keys/values of layer 0"
    ):
        cache.update(key, value, 0)
    assert lengths(cache) == [0, 0]


def test_exact_cache_keeps_non_finite_values_as_dynamic_cache_does() -> None:
    cache = SqueezedCache.from_model(tiny(), "none")
    key, value = kv(n=10)
    key[0, 0, 0, 0] = float("nan")
    keys, _ = cache.update(key, value, 0)
    assert torch.isnan(keys[0, 0, 0, 0]) and int(torch.isnan(keys).sum()) == 1


@pytest.mark.parametrize("model", [None, "smollm2-135m", 42, object()])
def test_from_model_refuses_what_is_not_a_model(model: object) -> None:
    with pytest.raises(ValueError, match=r"model: \w+ is not a transformers model"):
        SqueezedCache.from_model(model, "k4v4")


@pytest.mark.parametrize("fused", ["yes", 1, 0, "False"])
def test_from_model_refuses_a_non_bool_fused(fused: object) -> None:
    with pytest.raises(ValueError, match=r"fused: .*allowed: None \(follow the model\), True or False"):
        SqueezedCache.from_model(tiny(), "k4v4", fused=fused)


@pytest.mark.parametrize(
    "key, value, match",
    [
        (torch.randn(1, 2, 3, 64).numpy(), torch.randn(1, 2, 3, 64), r"key_states is ndarray"),
        ([[0.0]], torch.randn(1, 2, 3, 64), r"key_states is list"),
        (
            torch.ones(1, 2, 3, 64, dtype=torch.int64),
            torch.ones(1, 2, 3, 64, dtype=torch.int64),
            r"torch.int64 tensor",
        ),
        (
            torch.randn(1, 2, 3, 64),
            torch.randn(1, 2, 3, 64).half(),
            r"key_states torch.float32 and value_states torch.float16",
        ),
    ],
)
def test_update_refuses_other_types_and_dtypes(key: object, value: object, match: str) -> None:
    cache = SqueezedCache.from_model(tiny(), "k4v4")
    with pytest.raises(ValueError, match=match):
        cache.update(key, value, 0)


def test_update_refuses_a_dtype_change() -> None:
    cache = SqueezedCache.from_model(tiny(), "k4v4")
    cache.update(*kv(), 0)
    with pytest.raises(ValueError, match=r"layer 0 holds torch.float32"):
        cache.update(torch.randn(1, 2, 3, 64).half(), torch.randn(1, 2, 3, 64).half(), 0)
