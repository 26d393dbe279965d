"""Token policies combined with the page transforms (rotations, pre-RoPE keys): one `LayerStore`
applies them to every packed class (high and low) and stores exact parts untransformed.

Anchors: exact parts read back bit for bit; packed classes read back close to their tokens at their
own positions (pre-RoPE keys keep each token's cache position); on the tiny model, a transformed
policy stays as close to DynamicCache as the same policy without transforms; bytes held are reported.
"""

from __future__ import annotations

import pytest
import torch
from test_token_policies import CHUNKS, K2, V2, ids, rel_diff, run_chunks, small, tiny_models
from transformers import DynamicCache

from kvsqueeze.attention.reference import Workspace, materialize
from kvsqueeze.config import QuantSpec
from kvsqueeze.eval.memory import held_tensor_bytes, store_tensor_bytes
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.policies import Precision, Role, TokenPolicy
from kvsqueeze.quant.rope import Rope
from kvsqueeze.storage.layer import LayerStore
from kvsqueeze.storage.transform import layer_transforms

pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")

K8 = QuantSpec(bits=8, axis="channel", group_size=16)
V8 = QuantSpec(bits=8, axis="token", group_size=32)
K4 = QuantSpec(bits=4, axis="channel", group_size=16)
V4 = QuantSpec(bits=4, axis="token", group_size=32)
ALL = {"rotate_keys": True, "rotate_values": True, "pre_rope_keys": True}
TRANSFORMS = {
    "rotate-keys": {"rotate_keys": True},
    "rotate-values": {"rotate_values": True},
    "pre-rope-keys": {"pre_rope_keys": True},
    "all": ALL,
}
ROPE = Rope.default(64, 10000.0)


def store_for(
    policy: TokenPolicy, key: QuantSpec | None, value: QuantSpec | None, **transforms
) -> LayerStore:
    config = small(policy, key, value).replace(**transforms)
    return LayerStore(config, *layer_transforms(config, 64, ROPE))


def fill(store: LayerStore, chunks: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Append random tokens (1, 2, n, 64) in ``chunks``; returns all keys and values appended."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 1, 2, sum(chunks), 64, generator=gen).unbind(0)
    pos = 0
    for n in chunks:
        store.append(keys[:, :, pos : pos + n], values[:, :, pos : pos + n])
        store.settle()
        pos += n
    return keys, values


def read(store: LayerStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The held tokens as the reference read path hands them to attention (transforms undone)."""
    empty = torch.empty(1, 2, 0, 64)
    return materialize(store, empty, empty, Workspace())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_exact_parts_read_back_bit_for_bit(name: str) -> None:
    """Every token exact (sinks, the exact class, the window): nothing is transformed, and the read
    is the input itself (the exact class keeps sequence order here)."""
    store = store_for(TokenPolicy(default="exact"), K2, V2, **TRANSFORMS[name])
    keys, values = fill(store, (50, 7, 1, 30))
    got_k, got_v = read(store)
    assert store.classes[Precision.EXACT].num_tokens == 88 - 2 - store.window_k.num_tokens > 0
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_packed_classes_read_back_their_tokens_at_their_positions(name: str) -> None:
    """Roles send a span to the low class (int8 here) and the rest to the exact class: the low class
    reads back close to its own tokens, RoPE redone at each token's position (a wrong position
    would rotate channel pairs by a wrong angle: errors of the keys' size)."""
    store = store_for(TokenPolicy(roles={"text": "exact", "image": "low"}), K8, V8, **TRANSFORMS[name])
    roles = torch.zeros(1, 120, dtype=torch.int8)
    image = torch.arange(120) % 3 == 1  # every third token: the class's tokens are not contiguous
    image[:2] = False  # the sinks
    roles[:, image] = int(Role.IMAGE)
    store.set_roles(roles)
    keys, values = fill(store, (37, 1, 1, 45, 16, 20))
    low = store.classes[Precision.LOW]
    held = store.window_k.num_tokens
    decided = image.clone()
    decided[120 - held :] = False  # still undecided in the window
    assert low.num_tokens == int(decided.sum()) and low.pages_k.num_tokens >= 32 and low.stage_k.num_tokens
    got_k, got_v = read(store)
    exact = store.classes[Precision.EXACT].num_tokens
    start = 2 + exact  # [sinks | exact class | low class | window]
    for got, want in ((got_k, keys), (got_v, values)):
        region = got[:, :, start : start + low.num_tokens]
        expected = want[:, :, decided]
        assert (region - expected).abs().max() < 0.05 * expected.abs().max()
        assert torch.equal(got[:, :, 2:start], want[:, :, ~decided][:, :, 2 : 2 + exact])  # exact, as stored
    # bytes held: the store's own, plus the transform constants a cache counts once
    assert store.nbytes + held_tensor_bytes(store.constants()) == store_tensor_bytes([store])
    if TRANSFORMS[name].get("pre_rope_keys"):
        assert store.parts()["low_staging"] >= low.positions.nbytes > 0  # positions held and counted


@pytest.mark.parametrize(
    "policy",
    [
        TokenPolicy(scorer="knorm", evict=0.3, keep_exact=0.1),
        TokenPolicy(scorer="knorm", keep_high=0.3, high_key=K4, high_value=V4),
    ],
    ids=["evict-keep", "high-low"],
)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_transformed_policies_stay_as_close_as_untransformed_ones(policy: TokenPolicy, name: str) -> None:
    model = tiny_models()[0]
    tokens = ids(sum(CHUNKS))
    want = run_chunks(model, DynamicCache(config=model.config), tokens)
    errors = []
    for transforms in ({}, TRANSFORMS[name]):
        cache = SqueezedCache.from_model(model, small(policy, K2, V2).replace(**transforms))
        errors.append(rel_diff(run_chunks(model, cache, tokens), want))
        assert cache.nbytes() == store_tensor_bytes(layer.store for layer in cache.layers) > 0
        assert cache.get_seq_length() == sum(CHUNKS)
    plain, transformed = errors
    assert transformed < 1.1 * plain, errors  # measured: 0.28-0.30 vs 0.30; 0.115-0.129 vs 0.129
    counts = cache.layers[0].store.token_counts()
    assert counts["low"] > 0 and (counts["high"] > 0 or counts["evicted"] > 0)


def test_attention_scored_policies_with_transforms_need_the_fused_path() -> None:
    """The fused kernels read transformed classes (issue 16), so an attention scorer works with them;
    the reference path still cannot see the queries it needs."""
    config = small(TokenPolicy(scorer="attention", evict=0.5, keep_high=0.3, high_key=K4, high_value=V4))
    config = config.replace(rotate_values=True, pre_rope_keys=True)
    assert config.read_paths == ("fused",)
    ref, fused = tiny_models()
    with pytest.raises(ValueError, match="fused read path"):
        SqueezedCache.from_model(ref, config)
    cache = SqueezedCache.from_model(fused, config)
    assert cache.fused
    run_chunks(fused, cache, ids(sum(CHUNKS)))
    counts = cache.layers[0].store.token_counts()
    assert counts["high"] > 0 and counts["evicted"] > 0
