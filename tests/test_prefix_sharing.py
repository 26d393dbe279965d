"""Prefix sharing between caches on one `KVPool`: published blocks, hits, state after a hit, free
counts back to their start, refusals."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"allowed: \(1, tokens\)"):
        cache.match_prefix(prompt_ids(40).repeat(2, 1))
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
