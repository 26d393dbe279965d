"""Rollback (`crop`) for assisted and speculative decoding.

A cache that has seen rejected draft tokens and then cropped them must be in exactly the state of a
cache that never saw them: same sinks, same packed blocks (bit for bit), same residual window. Then
``generate(assistant_model=...)`` and prompt-lookup decoding give token for token the output of plain
greedy decoding with the same preset.
"""

from __future__ import annotations

import pytest
import torch
from tiny import prompt_ids, tiny_llama
from transformers import LlamaForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.attention.reference import Workspace, materialize
from kvsqueeze.config import CacheConfig, QuantSpec, preset
from kvsqueeze.storage.layer import LayerStore

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_WINDOW = CacheConfig(
    key=QuantSpec(bits=4, axis="channel", group_size=16),
    value=QuantSpec(bits=2, axis="token", group_size=32),
    sink_tokens=4,
    residual_window=16,
    block_size=16,
    page_tokens=32,
)
STORE_CONFIGS = {
    "k4v4": preset("k4v4"),
    "int8": preset("int8"),
    "k2v2": preset("k2v2"),
    "fp8": preset("fp8"),
    "none": preset("none"),
    "small-window": SMALL_WINDOW,
}


def kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, n, 64, generator=g), torch.randn(2, 2, n, 64, generator=g)


def state(store: LayerStore) -> tuple[tuple[int, int, int, int], torch.Tensor, torch.Tensor]:
    """Token counts by part and the dequantized keys/values a read sees."""
    counts = (
        store.sink_k.num_tokens,
        store.packed_k.num_tokens,
        store.window_k.num_tokens,
        store.pending_k.num_tokens,
    )
    empty = torch.empty(2, 2, 0, 64)
    keys, values = materialize(store, empty, empty, Workspace())
    return counts, keys.clone(), values.clone()


def assert_same_state(a: LayerStore, b: LayerStore) -> None:
    (ca, ka, va), (cb, kb, vb) = state(a), state(b)
    assert ca == cb
    assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("name", list(STORE_CONFIGS))
@pytest.mark.parametrize("prompt", [3, 40, 150, 300])
def test_crop_leaves_the_state_of_a_store_that_never_saw_the_rejected_tokens(name: str, prompt: int) -> None:
    config = STORE_CONFIGS[name]
    recorded, plain = LayerStore(config), LayerStore(config)
    recorded.record_past = True
    seed = 0
    accepted: list[tuple[torch.Tensor, torch.Tensor]] = [kv(prompt, seed)]
    draft_sizes = [5, 1, 11, 3, 8, 2, 17, 4] * 4
    # step: verify (accepted + draft) tokens, keep a prefix, crop the rest
    recorded.append(*accepted[0])
    for i, draft in enumerate(draft_sizes):
        seed += 1
        k, v = kv(draft + 1, seed)
        recorded.settle()  # as the cache layer does before each read
        recorded.append(k, v)
        keep = (i * 7) % (draft + 2)  # 0..draft+1 tokens accepted
        recorded.crop(draft + 1 - keep)
        if keep:
            accepted.append((k[:, :, :keep], v[:, :, :keep]))
    plain.append(torch.cat([k for k, _ in accepted], -2), torch.cat([v for _, v in accepted], -2))
    assert recorded.pending_k.num_tokens == 0
    assert_same_state(recorded, plain)


@pytest.mark.parametrize("name", ["k4v4", "small-window"])
def test_crop_without_recording_is_exact_or_refused(name: str) -> None:
    config = STORE_CONFIGS[name]
    store = LayerStore(config)
    k, v = kv(300, 0)
    store.append(k, v)
    packed = store.packed_k.num_tokens
    # removing tokens that only sit in the residual window and flushed no block: exact
    removable = [
        n for n in range(1, store.window_k.num_tokens + 1) if store.packed_tokens_for(300 - n) == packed
    ]
    assert removable
    n = removable[-1]
    before = state(store)
    with pytest.raises(ValueError, match="activate_past_recording") as info:
        store.crop(n + 1 if n + 1 <= store.num_tokens else n)
    assert "packed" in str(info.value)
    assert state(store)[0] == before[0]  # refused: unchanged
    store.crop(n)
    fresh = LayerStore(config)
    fresh.append(k[:, :, : 300 - n], v[:, :, : 300 - n])
    assert_same_state(store, fresh)


def test_crop_bad_counts_are_refused() -> None:
    store = LayerStore(SMALL_WINDOW)
    store.append(*kv(10, 0))
    with pytest.raises(ValueError, match="crop: 11 tokens to remove; allowed: 0 to 10"):
        store.crop(11)
    with pytest.raises(ValueError, match="crop: -1 tokens"):
        store.crop(-1)


# ------------------------------------------------------------------------------ through generate


def tiny(seed: int) -> LlamaForCausalLM:
    return tiny_llama(seed, attn="kvsqueeze")


# With the kvsqueeze attention each draft of a verification forward reads what plain decoding reads
# (tests/test_draft_reads.py); the rollback below leaves the state of a cache that never saw the
# rejected drafts, so the outputs agree token for token.
GENERATE_CONFIGS = ["k4v4", "int8", "best-3bit", "none"]


@pytest.mark.parametrize("config", GENERATE_CONFIGS, ids=str)
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_matches_plain_greedy(config: object, mode: str) -> None:
    model = tiny(0)
    ids = prompt_ids(150)
    kwargs = dict(max_new_tokens=60, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, cache=SqueezedCache.from_model(model, config), **kwargs)
        extra = {"prompt_lookup_num_tokens": 5} if mode == "prompt_lookup" else {"assistant_model": tiny(1)}
        cache = SqueezedCache.from_model(model, config)
        assisted = model.generate(ids, cache=cache, **extra, **kwargs)
    assert torch.equal(assisted, plain)
    assert cache.get_seq_length() == plain.shape[1] - 1
    for layer in cache.layers:  # every rejected token was cropped, every accepted one placed
        assert layer.store.pending_k.num_tokens == 0


@pytest.mark.parametrize("config", ["k2v2", SMALL_WINDOW], ids=["k2v2", "small-window"])
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_with_2_bit_values_leaves_a_consistent_cache(config: object, mode: str) -> None:
    model = tiny(0)
    ids = prompt_ids(150)
    extra = {"prompt_lookup_num_tokens": 5} if mode == "prompt_lookup" else {"assistant_model": tiny(1)}
    cache = SqueezedCache.from_model(model, config)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=60, do_sample=False, **extra)
    assert out.shape == (1, 210)
    assert cache.get_seq_length() == 209
    assert all(layer.store.pending_k.num_tokens == 0 for layer in cache.layers)


@pytest.mark.parametrize("name", ["k2v2-keep10-knorm", "knorm-50"])
def test_token_policies_refuse_rollback_before_generation(name: str) -> None:
    model = tiny(0)
    cache = SqueezedCache.from_model(model, name)
    with pytest.raises(ValueError, match="token-policy cache .* cannot roll back"):
        model.generate(prompt_ids(40), cache=cache, prompt_lookup_num_tokens=3, max_new_tokens=5)
    assert cache.get_seq_length() == 0  # refused before the prefill
    assert not cache.is_croppable


def test_assisted_decoding_on_a_filled_cache_is_refused_with_the_reason() -> None:
    """transformers numbers the new tokens of an assisted second turn from 0 (its DynamicCache then
    departs from plain greedy); the cache says so instead of suggesting a reset of the conversation."""
    model = tiny(0)
    cache = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        out = model.generate(
            prompt_ids(60), cache=cache, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=5
        )
        turn = torch.cat([out, prompt_ids(20)], dim=1)
        with pytest.raises(ValueError, match="assisted decoding on a cache that already holds 69 tokens"):
            model.generate(turn, cache=cache, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=5)
    assert cache.get_seq_length() == 69


@pytest.mark.parametrize("bad", ["a", 1.5, None, True])
def test_crop_counts_of_another_type_are_refused(bad: object) -> None:
    cache = SqueezedCache.from_model(tiny(0), "k4v4")
    with pytest.raises(ValueError, match=r"crop: .*allowed: an int"):
        cache.crop(bad)
