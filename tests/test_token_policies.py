"""Token policies: precision plans, the mixed-class layer store, eviction, in tiny Llama models.

The anchor: a token policy whose every class is exact (no eviction) reorders the held tokens but
must give the logits of transformers' `DynamicCache` (keys are post-RoPE, order does not matter).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvsqueeze.config import TOKEN_PRESETS, CacheConfig, QuantSpec, preset
from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.eval.methods import resolve_method
from kvsqueeze.integrations import SqueezedCache, register
from kvsqueeze.kernels import cpu
from kvsqueeze.policies import Counts, Precision, Role, TokenPolicy, mark_spans
from kvsqueeze.storage.layer import LayerStore

LOGIT_TOL = 1e-4
CHUNKS = [100] + [1, 7] * 10 + [1] * 6  # 186 tokens: chunked prefill, then decode
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")


pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")


def small(tokens: TokenPolicy, key: QuantSpec | None = None, value: QuantSpec | None = None) -> CacheConfig:
    """2 sinks, window 16, blocks of 16, pages of 32: every boundary is crossed in a short test."""
    return CacheConfig(
        key=key, value=value, sink_tokens=2, residual_window=16, block_size=16, page_tokens=32, tokens=tokens
    )


K2 = QuantSpec(bits=2, axis="channel", group_size=16)
V2 = QuantSpec(bits=2, axis="token", group_size=32)


# ----- the plan -------------------------------------------------------------------------------


def test_policy_validates_fields() -> None:
    with pytest.raises(ValueError, match="tokens.default"):
        TokenPolicy(default="medium")
    with pytest.raises(ValueError, match="tokens.scorer"):
        TokenPolicy(scorer="magic")
    with pytest.raises(ValueError, match="cannot rank"):
        TokenPolicy(keep_exact=0.1)
    with pytest.raises(ValueError, match="keep_exact"):
        TokenPolicy(scorer="knorm", keep_exact=1.5)
    with pytest.raises(ValueError, match="not a token role"):
        TokenPolicy(roles={"picture": "low"})
    with pytest.raises(ValueError, match="unknown keys"):
        TokenPolicy.from_dict({"evict_all": True})


def test_layer_keep_exact_validates_applies_per_layer_and_round_trips() -> None:
    policy = TokenPolicy(scorer="attention", keep_exact=0.1, layer_keep_exact={"3": 0.5, 1: 1.0})
    assert policy.layer_keep_exact == ((1, 1.0), (3, 0.5))
    assert policy.for_layer(3).keep_exact == 0.5 and policy.for_layer(3).layer_keep_exact == ()
    assert policy.for_layer(0).keep_exact == 0.1
    assert policy.mean_keep_exact(4) == pytest.approx((0.1 + 1.0 + 0.1 + 0.5) / 4)
    cfg = preset("k2v2").replace(tokens=policy)
    assert cfg.for_layer(1).tokens.keep_exact == 1.0 and cfg.for_layer(2).tokens.keep_exact == 0.1
    assert CacheConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in (
        ({1: 1.5}, r"layer_keep_exact\[1\]: 1.5 must be a fraction"),
        ({-1: 0.5}, "layer -1 must be an integer >= 0"),
        ([(1, 0.5), (1, 0.2)], "layer 1 repeats"),
        (0.5, "must map layer indices to fractions"),
    ):
        with pytest.raises(ValueError, match=match):
            TokenPolicy(scorer="knorm", layer_keep_exact=bad)
    with pytest.raises(ValueError, match="cannot rank tokens"):
        TokenPolicy(layer_keep_exact={0: 0.5})
    with pytest.raises(ValueError, match=r"tokens.layer_keep_exact: layers \[7\] do not exist"):
        cfg.replace(tokens=TokenPolicy(scorer="knorm", layer_keep_exact={7: 0.5})).check_model(3, 64, 4)


def test_layer_keep_exact_budgets_reach_the_stores(tiny_llama) -> None:
    policy = TokenPolicy(scorer="knorm", keep_exact=0.0, layer_keep_exact={1: 0.5})
    cache = SqueezedCache(small(policy, K2, V2), tiny_llama.config)
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tiny_llama(input_ids=ids, cache=cache, use_cache=True)
    exact = [layer.store.classes[Precision.EXACT].num_tokens for layer in cache.layers]
    decided = cache.layers[1].store.counts.decided
    assert exact == [0, decided // 2] and decided > 0


def test_token_policies_take_per_layer_overrides_and_transforms(tiny_llama) -> None:
    from kvsqueeze.config import LayerOverride

    k4 = QuantSpec(bits=4, axis="channel", group_size=16)
    policy = TokenPolicy(scorer="knorm", keep_exact=0.1, layer_keep_exact={1: 0.5})
    cfg = small(policy, K2, V2).replace(layer_overrides=(LayerOverride(1, k4, None),))
    one = cfg.for_layer(1)
    assert (one.key, one.value, one.tokens.keep_exact, one.layer_overrides) == (k4, None, 0.5, ())
    assert cfg.for_layer(0).key == K2 and cfg.for_layer(0).tokens.keep_exact == 0.1
    cache = SqueezedCache(cfg, tiny_llama.config)
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tiny_llama(input_ids=ids, cache=cache, use_cache=True)
    low = [layer.store.classes[Precision.LOW] for layer in cache.layers]
    assert low[0].pages_k.spec == K2 and low[1].pages_k.spec == k4 and low[1].pages_v.is_exact
    rotated = cfg.replace(rotate_keys=True, pre_rope_keys=True)  # read fused since issue 16
    assert rotated.tokens == policy and rotated.kernel_readable


def test_keep_exact_by_layer_water_fills_the_budget() -> None:
    from kvsqueeze.calibration.allocation import keep_exact_by_layer

    got = keep_exact_by_layer({0: 1.0, 1: 10.0, 2: 0.0, 3: 1.0}, 0.3)
    assert got[1] == 1.0 and got[2] == 0.0 and got[0] == got[3] == pytest.approx(0.1, abs=1e-3)
    assert sum(got.values()) / 4 == pytest.approx(0.3, abs=1e-3)
    assert keep_exact_by_layer({0: 0.0, 1: 0.0}, 0.2) == {0: 0.2, 1: 0.2}
    spread = keep_exact_by_layer({0: 5.0, 1: 0.0, 2: 0.0}, 0.6)  # more budget than one layer holds
    assert spread[0] == 1.0 and spread[1] == spread[2] == pytest.approx(0.4, abs=1e-3)


def test_k2v2_keep10_uses_the_bundled_per_layer_budgets_of_the_embedded_model(tiny_llama) -> None:
    smollm2 = LlamaConfig(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )  # fmt: skip
    register()
    smollm2._attn_implementation = "kvsqueeze"  # the attention scorer needs the fused path
    cache = SqueezedCache("k2v2-keep10", smollm2, fused=True)
    tokens = cache.cache_config.tokens
    assert cache.cache_config.replace(tokens=preset("k2v2-keep10").tokens, model_fingerprint=()) == preset(
        "k2v2-keep10"
    )
    assert tokens.mean_keep_exact(30) == pytest.approx(0.10, abs=1e-4)
    assert max(f for _, f in tokens.layer_keep_exact) == 1.0  # the most sensitive layer entirely exact
    keeps = [layer.store.tokens.keep_exact for layer in cache.layers]
    assert keeps == [tokens.for_layer(i).keep_exact for i in range(30)] and len(set(keeps)) > 2
    other = copy.deepcopy(tiny_llama.config)
    other._attn_implementation = "kvsqueeze"
    assert SqueezedCache("k2v2-keep10", other, fused=True).cache_config == preset("k2v2-keep10")  # generic


def test_calibrate_spreads_keep_exact_over_layers(tiny_llama, tmp_path) -> None:
    from kvsqueeze.calibration.run import calibrate, save

    ids = torch.randint(1, 256, (400,), generator=torch.Generator().manual_seed(3))
    base = small(TokenPolicy(scorer="knorm", keep_exact=0.25), K2, V2)
    data = calibrate(
        tiny_llama,
        ids,
        base,
        0.0,
        (2,),
        num_tokens=200,
        prefill_tokens=64,
        score_tokens=16,
        log=lambda m: None,
    )
    cal = data["calibration"]
    assert set(cal["sensitivity"]) == {"0", "1"} and cal["mean_keep_exact"] == pytest.approx(0.25, abs=1e-3)
    cfg = CacheConfig.load(save(data, tmp_path / "keep.json", "tiny", "random ids"))
    assert dict(cfg.tokens.layer_keep_exact) == {int(k): v for k, v in cal["layer_keep_exact"].items()}
    with pytest.raises(ValueError, match="tokens.keep_exact"):
        calibrate(
            tiny_llama, ids, small(TokenPolicy(scorer="knorm", keep_exact=5), K2, V2), 0.0, (2,), 200, 64, 16
        )
    with pytest.raises(ValueError, match="reuse: a token-policy calibration"):
        calibrate(tiny_llama, ids, base, 0.0, (2,), 200, 64, 16, reuse=cal)


def test_config_round_trips_with_token_policy() -> None:
    for name, config in TOKEN_PRESETS.items():
        assert CacheConfig.from_dict(config.to_dict()) == config, name
        assert preset(name) is config
    assert "tokens" not in preset("k4v4").to_dict()


def test_plan_budgets_are_running_totals_and_rows_equal() -> None:
    policy = TokenPolicy(scorer="knorm", keep_exact=0.25, evict=0.25)
    roles = torch.zeros(2, 8, dtype=torch.int8)
    scores = torch.arange(2 * 3 * 8, dtype=torch.float).reshape(2, 3, 8)
    classes, done = policy.classes(roles, scores, 3, Counts())
    assert done == Counts(decided=8, exact=2, high=0, evicted=2)
    assert (classes[..., 6:] == Precision.EXACT).all() and (classes[..., :2] == Precision.EVICT).all()
    assert (classes[..., 2:6] == Precision.LOW).all()
    # 3 more tokens: floor(0.25 * 11) = 2 exact already used -> none now
    classes, done = policy.classes(roles[:, :3], scores[..., :3], 3, done)
    assert done.exact == 2 and (classes != Precision.EXACT).all()


def test_plan_roles_force_classes_and_rows_must_agree() -> None:
    policy = TokenPolicy(roles={"text": "exact", "image": "low"})
    roles = torch.tensor([[0, 1, 1, 0]], dtype=torch.int8)
    classes, _ = policy.classes(roles, None, 2, Counts())
    assert classes[0, 0].tolist() == [Precision.EXACT, Precision.LOW, Precision.LOW, Precision.EXACT]
    uneven = TokenPolicy(scorer="knorm", keep_exact=0.5, roles={"image": "low"})
    with pytest.raises(ValueError, match="roles"):
        uneven.classes(torch.tensor([[1, 0], [0, 0]], dtype=torch.int8), torch.zeros(2, 1, 2), 1, Counts())


# ----- the store ------------------------------------------------------------------------------


def held_bytes(store: LayerStore) -> int:
    """Bytes of every distinct tensor the store holds (independent of its own accounting)."""
    return store_tensor_bytes([store])


def test_store_sends_roles_to_classes_and_counts_bytes() -> None:
    store = LayerStore(small(TokenPolicy(roles={"text": "exact", "image": "low"}), K2, V2))
    roles = torch.zeros(1, 200, dtype=torch.int8)
    roles[:, 20:148] = int(Role.IMAGE)  # 128 image tokens
    store.set_roles(roles)
    torch.manual_seed(0)
    for n in (100, 50, 50):
        k, v = torch.randn(2, 1, 3, n, 64).unbind(0)
        store.append(k, v)
        store.settle()
    assert store.num_seen == store.num_tokens == 200
    assert store.classes[Precision.LOW].num_tokens == 128
    assert store.classes[Precision.LOW].pages_k.num_tokens == 128  # whole blocks packed
    assert store.classes[Precision.EXACT].num_tokens == 200 - 128 - 2 - store.window_k.num_tokens
    assert store.nbytes == held_bytes(store)
    assert sum(n for *_, n in store.segments(k, v)) == store.num_tokens


def test_exact_class_window_and_staging_hold_about_their_tokens() -> None:
    """No page tails or full-capacity buffers: a short run holds close to its tokens' bytes."""
    store = LayerStore(small(TokenPolicy(scorer="knorm", keep_exact=0.25), K2, V2))
    torch.manual_seed(1)
    for n in (90, 3, 2):
        k, v = torch.randn(2, 1, 3, n, 64).unbind(0)
        store.append(k, v)
        store.settle()
    exact = store.classes[Precision.EXACT]
    row = 3 * 64 * 4  # bytes of one float32 token
    assert store.counts.decided == 80 and exact.num_tokens == 20  # 25 % of the decided tokens
    assert exact.parts("exact")["exact_keys"] == 20 * row  # no page tail
    assert store.window_k.num_tokens == 13 and store.window_k.nbytes == 13 * row
    low = store.classes[Precision.LOW]
    assert low.stage_k.num_tokens == 60 - 48 and low.stage_k.nbytes == 12 * row
    assert store.nbytes == held_bytes(store)


def test_store_evicts_and_keeps_rectangular_rows() -> None:
    store = LayerStore(small(TokenPolicy(scorer="knorm", evict=0.5, default="exact")))
    for n in (64, 1, 31, 64):
        k, v = torch.randn(2, 2, 3, n, 64).unbind(0)
        store.append(k, v)
        store.settle()
    decided = 160 - 2 - store.window_k.num_tokens
    assert store.num_seen == 160
    assert store.num_tokens == 160 - decided // 2
    assert store.nbytes == held_bytes(store)


# ----- tiny models ----------------------------------------------------------------------------


@functools.cache
def tiny_models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(sdpa model, the same weights with attn_implementation="kvsqueeze")."""
    register()
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    fused = copy.deepcopy(model)
    fused.set_attn_implementation("kvsqueeze")
    return model, fused


def ids(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def run_chunks(model, cache, tokens):
    out, pos = [], 0
    for n in CHUNKS:
        out.append(model(tokens[:, pos : pos + n], cache=cache, use_cache=True).logits)
        pos += n
    return torch.cat(out, dim=1)


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


ALL_EXACT = {
    "roles": TokenPolicy(default="exact", roles={"instruction": "high"}),
    "knorm-keep": TokenPolicy(default="high", scorer="knorm", keep_exact=0.3),
}


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("name", ALL_EXACT)
def test_exact_classes_reproduce_dynamic_cache(name, fused) -> None:
    if fused and not cpu.available():
        pytest.skip("native CPU kernels could not be built")
    model = tiny_models()[1 if fused else 0]
    tokens = ids(sum(CHUNKS))
    want = run_chunks(tiny_models()[0], DynamicCache(config=model.config), tokens)
    cache = SqueezedCache.from_model(model, small(ALL_EXACT[name]), fused=fused)
    cache.set_roles(mark_spans(torch.zeros(1, 40, dtype=torch.int8), [(10, 30)]))
    got = run_chunks(model, cache, tokens)
    assert rel_diff(got, want) < LOGIT_TOL
    layer = cache.layers[0].store
    assert layer.classes[Precision.HIGH].num_tokens > 0 and layer.classes[Precision.EXACT].num_tokens > 0


@needs_kernels
def test_knorm_fused_matches_reference_with_eviction_and_quantization() -> None:
    ref, fused = tiny_models()
    config = small(TokenPolicy(scorer="knorm", evict=0.3, keep_exact=0.1), K2, V2)
    tokens = ids(sum(CHUNKS))
    want = run_chunks(ref, SqueezedCache.from_model(ref, config), tokens)
    cache = SqueezedCache.from_model(fused, config)
    got = run_chunks(fused, cache, tokens)
    assert rel_diff(got, want) < LOGIT_TOL
    assert cache.get_seq_length() == sum(CHUNKS)
    assert cache.layers[0].store.num_tokens < sum(CHUNKS)


def test_attention_scorer_needs_the_fused_path() -> None:
    with pytest.raises(ValueError, match="fused read path"):
        SqueezedCache.from_model(tiny_models()[0], "h2o-50")


@pytest.mark.parametrize("name", list(TOKEN_PRESETS))
def test_every_token_preset_generates_and_reports_bytes(name) -> None:
    if preset(name).needs_attention and not cpu.available():
        pytest.skip("native CPU kernels could not be built")
    model = tiny_models()[0]
    method = resolve_method(name)
    model = copy.deepcopy(model)
    cache = method.make_cache(model)
    prompt = ids(300)
    cache.set_roles(mark_spans(torch.zeros(1, 300, dtype=torch.int8), [(0, 20), (280, 300)]))
    with torch.inference_mode():
        out = model.generate(prompt, cache=cache, max_new_tokens=20, do_sample=False)
    assert out.shape[-1] == 320
    report = cache.memory_report()
    assert report.num_tokens == 319  # the last generated token is not fed back
    assert report.total_bytes == cache.nbytes() == sum(held_bytes(layer.store) for layer in cache.layers)


@needs_kernels
def test_eviction_generate_matches_manual_decode() -> None:
    """generate (masks from get_mask_sizes) and a mask-free loop agree after eviction."""
    _, fused = tiny_models()
    config = small(TokenPolicy(scorer="attention", evict=0.5, default="exact"))
    prompt = ids(150)
    with torch.inference_mode():
        cache = SqueezedCache.from_model(fused, config)
        out = fused.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            cache=cache,
            max_new_tokens=12,
            do_sample=False,
        )
        cache2 = SqueezedCache.from_model(fused, config)
        logits = fused(prompt, cache=cache2, use_cache=True).logits[:, -1:]
        manual = [logits.argmax(-1)]
        for _ in range(11):
            manual.append(fused(manual[-1], cache=cache2, use_cache=True).logits[:, -1:].argmax(-1))
    assert out[:, 150:].tolist() == torch.cat(manual, dim=1).tolist()
    assert cache.layers[0].store.num_tokens < cache.get_seq_length()
