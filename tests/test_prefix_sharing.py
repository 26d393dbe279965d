"""Prefix sharing between caches on one `KVPool`: published blocks, hits, state after a hit, free
counts back to their start, refusals."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from tiny import prompt_ids, tiny_llama

from kvsqueeze import KVPool, SqueezedCache
from kvsqueeze.config import CacheConfig, QuantSpec
from kvsqueeze.storage.layer import LayerStore

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = CacheConfig(
    key=QuantSpec(bits=4, axis="channel", group_size=16),
    value=QuantSpec(bits=4, axis="token", group_size=32),
    sink_tokens=4,
    residual_window=32,
    block_size=16,
    page_tokens=64,
)


def _ids(n: int, tail_seed: int | None = None, shared: int = 0) -> torch.Tensor:
    """(1, n) ids: the first ``shared`` from a fixed prompt, the rest seeded by ``tail_seed``."""
    head = prompt_ids(shared) if shared else torch.empty(1, 0, dtype=torch.long)
    g = torch.Generator().manual_seed(100 + (tail_seed or 0))
    return torch.cat([head, torch.randint(1, 128, (1, n - shared), generator=g)], dim=1)


def _stores(cache: SqueezedCache) -> list[LayerStore]:
    return [layer.store for layer in cache.layers]


def _prefill(model, cache: SqueezedCache, ids: torch.Tensor) -> torch.Tensor:
    held = cache.get_seq_length()
    with torch.no_grad():
        return model(ids[:, held:], cache=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("attn", ["sdpa", "kvsqueeze"])
def test_second_sequence_takes_the_prefix_blocks(attn: str) -> None:
    model = tiny_llama(attn=attn)
    pool = KVPool()
    first = SqueezedCache.from_model(model, CONFIG, pool=pool)
    a = _ids(200, tail_seed=1, shared=150)
    _prefill(model, first, a)
    store = _stores(first)[0]
    # 200 tokens: 4 sinks, a window of 17..32 -> 176 packed = 11 blocks, all published (+ the root)
    assert store.packed_k.num_tokens == 176 and first.published == 11 and len(pool.prefix) == 12
    used = pool.num_used
    assert used == 2 * 2 * 11  # 2 layers x keys and values x 11 blocks

    second = SqueezedCache.from_model(model, CONFIG, pool=pool)
    b = _ids(230, tail_seed=2, shared=150)
    held = second.match_prefix(b)
    assert held == 4 + 9 * 16  # sinks + every block inside the shared 150 tokens (146 -> 9 blocks)
    assert second.get_seq_length() == held and pool.num_used == used  # by reference: nothing new
    for s1, s2 in zip(_stores(first), _stores(second), strict=True):
        assert torch.equal(s1.packed_k.tables.view()[:, :9], s2.packed_k.tables.view())
        assert torch.equal(s1.sink_k.view(), s2.sink_k.view())
        assert s2.packed_k.pool is s1.packed_k.pool and s2.packed_k.pool.refs[0] == 2
    assert pool.prefix.hits == 9
    logits = _prefill(model, second, b)  # the model runs on 230 - 148 tokens only
    fresh = SqueezedCache.from_model(model, CONFIG)  # a cache of its own computes all 230
    expected = _prefill(model, fresh, b)
    assert torch.allclose(logits, expected, atol=2e-2), (logits - expected).abs().max()
    assert second.get_seq_length() == fresh.get_seq_length() == 230

    first.reset()
    second.reset()
    assert pool.num_used == 0 and pool.num_free == sum(p.num_blocks for p in pool.pools.values())
    third = SqueezedCache.from_model(model, CONFIG, pool=pool)
    assert third.match_prefix(b) > held  # freed blocks keep their content until reused


def test_generate_uses_the_hit_and_matches_a_fresh_cache() -> None:
    model = tiny_llama(attn="kvsqueeze")
    pool = KVPool()
    prompt = _ids(180, tail_seed=3, shared=180)
    donor = SqueezedCache.from_model(model, CONFIG, pool=pool)
    with torch.no_grad():
        model.generate(prompt, cache=donor, max_new_tokens=4, do_sample=False)
    taker = SqueezedCache.from_model(model, CONFIG, pool=pool)
    assert taker.match_prefix(prompt) == 4 + 10 * 16  # 176 of 180: 4 tokens left to compute
    with torch.no_grad():
        out = model.generate(prompt, cache=taker, max_new_tokens=8, do_sample=False)
        ref = model.generate(
            prompt, cache=SqueezedCache.from_model(model, CONFIG), max_new_tokens=8, do_sample=False
        )
    assert out.shape == ref.shape == (1, 188)
    assert torch.equal(out, ref)  # greedy tokens equal those of a cache of its own
    assert taker.get_seq_length() == 187


def test_no_hit_for_other_tokens_config_or_short_prompts() -> None:
    model = tiny_llama()
    pool = KVPool()
    _prefill(model, SqueezedCache.from_model(model, CONFIG, pool=pool), _ids(120, tail_seed=4, shared=100))
    other = SqueezedCache.from_model(model, CONFIG, pool=pool)
    assert other.match_prefix(_ids(120, tail_seed=5)) == 0  # another prompt from token 0
    changed = _ids(120, tail_seed=4, shared=100)
    changed[0, 2] += 1  # a sink token differs: no root
    assert other.match_prefix(changed) == 0
    assert other.match_prefix(prompt_ids(20)) == 0  # sinks + 16 tokens = the whole prompt: one is left
    wider = CacheConfig(**{**CONFIG.to_dict(), "residual_window": 48})
    assert (
        SqueezedCache.from_model(model, wider, pool=pool).match_prefix(_ids(120, tail_seed=4, shared=100))
        == 0
    )
    assert pool.prefix.hits == 0 and pool.prefix.queries > 0


def test_refusals() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="no shared pool"):
        SqueezedCache.from_model(model, CONFIG).match_prefix(prompt_ids(40))
    with pytest.raises(ValueError, match="pool: dict"):
        SqueezedCache.from_model(model, CONFIG, pool={})
    pool = KVPool()
    cache = SqueezedCache.from_model(model, CONFIG, pool=pool)
    with pytest.raises(ValueError, match=r"allowed: \(1, tokens\) integer token ids"):
        cache.match_prefix(prompt_ids(40).repeat(2, 1))
    with pytest.raises(ValueError, match=r"float32; allowed: \(1, tokens\) integer token ids"):
        cache.match_prefix(prompt_ids(40).float())
    _prefill(model, cache, prompt_ids(40))
    with pytest.raises(ValueError, match="already holds 40 tokens"):
        cache.match_prefix(prompt_ids(40))


def test_batches_and_token_policies_never_publish() -> None:
    model = tiny_llama()
    pool = KVPool()
    batch = SqueezedCache.from_model(model, CONFIG, pool=pool)
    _prefill(model, batch, torch.cat([prompt_ids(120), _ids(120, tail_seed=6)]))
    assert batch.token_ids is None and len(pool.prefix) == 0 and pool.num_used > 0
    policy = SqueezedCache.from_model(model, "knorm-50", pool=pool)
    _prefill(model, policy, prompt_ids(200))
    assert len(pool.prefix) == 0
    assert SqueezedCache.from_model(model, "knorm-50", pool=pool).match_prefix(prompt_ids(200)) == 0


def test_a_dropped_cache_gives_its_blocks_back() -> None:
    model = tiny_llama()
    pool = KVPool()
    for seed in range(3):
        cache = SqueezedCache.from_model(model, CONFIG, pool=pool)
        _prefill(model, cache, _ids(120, tail_seed=seed))
        assert pool.num_used == 2 * 2 * 6  # 116 tokens after the sinks: 6 blocks + a window of 20
        del cache  # no reset(): the finalizer releases the blocks
        gc.collect()
        assert pool.num_used == 0


def test_a_root_outlives_the_first_sequence_that_published_it() -> None:
    """Two prompts with the same sink tokens but different blocks: the first one's blocks are reused,
    the second one's chain still hits (its first block keeps the root alive)."""
    model = tiny_llama()
    pool = KVPool()
    a, b = (
        SqueezedCache.from_model(model, CONFIG, pool=pool),
        SqueezedCache.from_model(model, CONFIG, pool=pool),
    )
    ids_a, ids_b = _ids(200, tail_seed=7, shared=4), _ids(200, tail_seed=8, shared=4)
    _prefill(model, a, ids_a)
    _prefill(model, b, ids_b)
    a.reset()
    filler = SqueezedCache.from_model(model, CONFIG, pool=pool)
    _prefill(model, filler, _ids(200, tail_seed=9))  # reuses a's freed blocks: a's entries go
    assert SqueezedCache.from_model(model, CONFIG, pool=pool).match_prefix(ids_a) == 0
    assert SqueezedCache.from_model(model, CONFIG, pool=pool).match_prefix(ids_b) == 4 + 11 * 16


def test_one_model_per_pool() -> None:
    pool = KVPool()
    SqueezedCache.from_model(tiny_llama(), CONFIG, pool=pool)
    with pytest.raises(
        ValueError, match="pool: this KVPool serves a model with head_dim 64, this one has 32"
    ):
        SqueezedCache.from_model(tiny_llama(head_dim=32), CONFIG.replace(key=None, value=None), pool=pool)
    with pytest.raises(ValueError, match="dtype float32, this one has bfloat16"):
        SqueezedCache.from_model(tiny_llama(dtype=torch.bfloat16), CONFIG, pool=pool)
    # same config, other weights: the digest differs, so no block is taken
    other = tiny_llama(seed=1)
    _prefill(tiny_llama(), SqueezedCache.from_model(tiny_llama(), CONFIG, pool=pool), _ids(120, tail_seed=1))
    assert SqueezedCache.from_model(other, CONFIG, pool=pool).match_prefix(_ids(120, tail_seed=1)) == 0


def test_a_hit_keeps_exact_values_beyond_float16() -> None:
    """The donor's exact parts widened to float32 (keys beyond float16's range): the taker keeps
    them in float32 too instead of rounding them to inf."""
    model = copy.deepcopy(tiny_llama())
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(1e6)
    pool = KVPool()
    ids = _ids(200, tail_seed=10, shared=150)
    with pytest.warns(RuntimeWarning, match="exceed torch.float16"):
        _prefill(model, SqueezedCache.from_model(model, CONFIG, pool=pool), ids)
    taker = SqueezedCache.from_model(model, CONFIG, pool=pool)
    assert taker.match_prefix(ids) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logits = _prefill(model, taker, ids)
        expected = _prefill(model, SqueezedCache.from_model(model, CONFIG), ids)
    assert torch.isfinite(logits).all()  # rounded to float16, the sinks were inf and the logits NaN
    # the taker reads the prefix from quantized blocks, the fresh cache exact within one forward:
    # with keys ~1e6 the quantization error shows more than on the other tests
    assert torch.allclose(logits, expected, atol=0.2), (logits - expected).abs().max()
