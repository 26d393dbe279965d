"""Token-policy caches (``CacheConfig.tokens``: eviction, importance classes) honour
``CacheConfig.exact_dtype`` as plain layers do: on a float32 model their exact parts (sinks, window,
staging, exact class) are float16 by default ("auto") whenever the policy quantizes or evicts,
float32 with ``exact_dtype="model"``; tokens are rounded before they are stored or quantized; an
exact value beyond float16 widens the store (RuntimeWarning); the bytes reported are the bytes held.

Before, they kept every exact token in float32: knorm-50 held 1.061x the bytes of an fp16 cache
after 1500 tokens (now 0.531x), and a 400-token prompt + 12 tokens 1.221x (now 0.611x).
"""

from __future__ import annotations

import pytest
import torch
from held import reachable_tensor_bytes
from tiny import tiny_llama
from transformers import DynamicCache, LlamaForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.config import CacheConfig, QuantSpec, preset
from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.kernels import cpu
from kvsqueeze.policies import Precision, TokenPolicy, presses
from kvsqueeze.storage.exact_buffer import ExactBuffer, ExactChunks
from kvsqueeze.storage.layer import LayerStore
from kvsqueeze.storage.pages import PagedStore
from kvsqueeze.storage.policy_placement import PolicyPlacement
from kvsqueeze.storage.row_sinks import RowSinks

pytestmark = pytest.mark.usefixtures("one_thread")

INT8_HIGH = dict(
    high_key=QuantSpec(bits=8, axis="channel", group_size=64),
    high_value=QuantSpec(bits=8, axis="token", group_size=64),
)
CONFIGS: dict[str, CacheConfig] = {
    # eviction alone: the kept tokens exact
    "knorm-50": preset("knorm-50"),
    # the CLI's --evict 0.5 (default --kv k4v2): eviction + quantization
    "evict-0.5": preset("k4v2").replace(tokens=presses.knorm(0.5, default="low")),
    # importance classes with quantization, the policy naming float16 itself
    "k2v2-keep10-knorm": preset("k2v2-keep10-knorm"),
    # importance classes with quantization, no dtype in the policy
    "k2v2-keep-exact": preset("k2v2").replace(tokens=TokenPolicy(scorer="knorm", keep_exact=0.1)),
    # an int8 high class, eviction and a k4v4 low class
    "k4v4-high-evict": preset("k4v4").replace(
        tokens=TokenPolicy(scorer="knorm", keep_high=0.2, evict=0.3, **INT8_HIGH)
    ),
    # eviction with exact classes only, some of them promoted
    "exact-keep-evict": CacheConfig(key=None, value=None).replace(
        tokens=TokenPolicy(default="exact", scorer="knorm", keep_exact=0.1, evict=0.4)
    ),
}
EVICTING = {"knorm-50", "evict-0.5", "k4v4-high-evict", "exact-keep-evict"}


def tiny(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return tiny_llama(dtype=dtype, max_position_embeddings=4096)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def stores(cache: SqueezedCache) -> list[LayerStore]:
    out = [layer.store for layer in cache.layers]
    assert all(isinstance(s, LayerStore) and s.tokens is not None for s in out)  # token-policy stores
    return out


def held(model: LlamaForCausalLM, config: CacheConfig, prompt: int, decode: int = 0) -> SqueezedCache:
    """A cache after a ``prompt``-token prefill and ``decode`` greedy steps; its reported bytes checked
    against the tensors its stores hold (walked, not their own bookkeeping)."""
    cache = SqueezedCache.from_model(model, config)
    with torch.no_grad():
        out = model(ids(prompt, prompt), cache=cache)
        for _ in range(decode):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    assert cache.nbytes() == store_tensor_bytes(stores(cache))  # reported bytes are the bytes held
    assert cache.nbytes() == reachable_tensor_bytes(cache)  # scores and roles included
    return cache


def exact_tensors(store: LayerStore) -> list[torch.Tensor]:
    """Every exact tensor the store holds: sinks, window, staging, exact class, exact pages."""
    data = [b for b in store.buffers() if not isinstance(b, PolicyPlacement)]  # not its float32 scores
    exact = [b for b in data if not isinstance(b, PagedStore) or b.is_exact]
    assert all(isinstance(b, (ExactBuffer, ExactChunks, PagedStore, RowSinks)) for b in exact)
    return [t for b in exact for t in b.tensors()]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("exact_dtype, expected", [("auto", torch.float16), ("model", torch.float32)])
def test_exact_parts_follow_exact_dtype(name: str, exact_dtype: str, expected: torch.dtype) -> None:
    cache = held(tiny(), CONFIGS[name].replace(exact_dtype=exact_dtype), 300, 3)
    for store in stores(cache):
        assert store.exact_dtype == expected
        tensors = exact_tensors(store)
        assert tensors and {t.dtype for t in tensors} == {expected}
        assert store.classes[Precision.EXACT].num_tokens or store.classes[Precision.LOW].num_tokens


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prompt, decode", [(16, 0), (70, 0), (131, 1), (200, 5), (700, 3), (1500, 0)])
def test_reported_bytes_are_held_bytes_and_at_most_fp16(name: str, prompt: int, decode: int) -> None:
    cache = held(tiny(), CONFIGS[name], prompt, decode)
    report = cache.memory_report()
    assert report.num_tokens == prompt + decode
    assert report.total_bytes == cache.nbytes()
    assert report.ratio_to_fp16 <= 1.0, report  # every exact token in 16 bits, the rest packed or gone
    if name in EVICTING and prompt >= 700:
        evicted = prompt + decode - sum(s.num_tokens for s in stores(cache)) // len(cache.layers)
        assert evicted > 0
        assert report.ratio_to_fp16 <= 0.7, report


def test_knorm_50_holds_about_half_an_fp16_cache_at_1500_tokens() -> None:
    """It held 1.061x an fp16 cache before (every exact token in float32)."""
    report = held(tiny(), preset("knorm-50"), 1500).memory_report()
    # 4 sinks + 1408 tokens that left the window in blocks of 64 (half evicted) + 88 in the window
    assert report.ratio_to_fp16 == pytest.approx((4 + 1408 // 2 + 88) / 1500, abs=1e-6)
    model_dtype = held(tiny(), preset("knorm-50").replace(exact_dtype="model"), 1500).memory_report()
    assert model_dtype.total_bytes == 2 * report.total_bytes


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_stays_close_to_float32_exact_parts(name: str) -> None:
    """float16 exact parts change a short generate by little (eviction and quantization change the
    logits of this random model by 8 to 90 %, see `test_eviction_changes_more_than_the_dtype`)."""
    model, prompt = tiny(), ids(400, 3)
    runs = []
    for exact_dtype in ("auto", "model"):
        cache = SqueezedCache.from_model(model, CONFIGS[name].replace(exact_dtype=exact_dtype))
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                cache=cache,
                max_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        runs.append((out.sequences, torch.stack(out.logits, 1)))
    (seq16, logits16), (seq32, logits32) = runs
    assert torch.equal(seq16, seq32)
    assert ((logits16 - logits32).abs().max() / logits32.abs().max()).item() < 2e-2


def test_eviction_changes_more_than_the_dtype() -> None:
    model, prompt = tiny(), ids(400, 3)
    with torch.no_grad():
        want = model(prompt, cache=DynamicCache(config=model.config)).logits[:, -1]
        got = []
        for exact_dtype in ("auto", "model"):
            cache = SqueezedCache.from_model(model, preset("knorm-50").replace(exact_dtype=exact_dtype))
            model(prompt[:, :-1], cache=cache)
            got.append(model(prompt[:, -1:], cache=cache).logits[:, -1])
    scale = want.abs().max()
    assert (got[0] - got[1]).abs().max() / scale < 1e-3 < (got[1] - want).abs().max() / scale


@pytest.mark.parametrize(
    "policy",
    [
        TokenPolicy(default="exact", roles={"instruction": "high"}),
        TokenPolicy(default="high", scorer="knorm", keep_exact=0.3),
    ],
    ids=["roles", "knorm-keep"],
)
def test_policies_that_keep_every_token_exact_keep_the_model_dtype(policy: TokenPolicy) -> None:
    """Nothing quantized, nothing evicted: float32 stays, and the logits are DynamicCache's."""
    model = tiny()
    config = CacheConfig(
        key=None, value=None, sink_tokens=2, residual_window=16, block_size=16, page_tokens=32, tokens=policy
    )
    prompt = ids(150, 1)
    with torch.no_grad():
        cache = SqueezedCache.from_model(model, config)
        got = model(prompt, cache=cache).logits
        got = torch.cat([got, model(ids(1, 2), cache=cache).logits], dim=1)
        ref = DynamicCache(config=model.config)
        want = model(prompt, cache=ref).logits
        want = torch.cat([want, model(ids(1, 2), cache=ref).logits], dim=1)
    assert all(s.exact_dtype == torch.float32 for s in stores(cache))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_models_keep_their_dtype(dtype: torch.dtype) -> None:
    cache = held(tiny(dtype), preset("knorm-50"), 200)
    assert {t.dtype for s in stores(cache) for t in exact_tensors(s)} == {dtype}


def test_a_policy_dtype_applies_under_auto_and_yields_to_an_explicit_choice() -> None:
    config = preset("k2v2-keep10-knorm")  # tokens.exact_dtype "float16"
    assert stores(held(tiny(torch.bfloat16), config, 200))[0].exact_dtype == torch.float16
    explicit = config.replace(exact_dtype="bfloat16")
    assert stores(held(tiny(), explicit, 200))[0].exact_dtype == torch.bfloat16


def small(policy: TokenPolicy) -> CacheConfig:
    k2 = QuantSpec(bits=2, axis="channel", group_size=16)
    v2 = QuantSpec(bits=2, axis="token", group_size=32)
    return CacheConfig(
        key=k2, value=v2, sink_tokens=2, residual_window=16, block_size=16, page_tokens=32, tokens=policy
    )


def test_packed_blocks_are_quantized_from_the_rounded_tokens_however_they_arrive() -> None:
    """One chunk (blocks go straight to the low class), chunks of 7 and one token at a time (every
    token waits in the float16 window first) pack the same blocks: those of the rounded tokens."""
    torch.manual_seed(0)
    key, value = torch.randn(2, 1, 2, 200, 64).unbind(0)
    key = key * 3 + 1.1e-3  # values float16 rounds
    packed = []
    for chunks in ([200], [7] * 28 + [4], [1] * 200):
        cache = SqueezedCache.from_model(tiny(), small(TokenPolicy()))
        pos = 0
        for n in chunks:
            cache.update(key[:, :, pos : pos + n], value[:, :, pos : pos + n], 0)
            pos += n
        low = cache.layers[0].store.classes[Precision.LOW]
        assert low.pages_k.num_tokens == 192 and low.stage_k.num_tokens == 0  # 6 left in the window
        out = torch.empty(1, 2, 192, 64)
        packed.append((low.pages_k.dequantize_into(out.clone()), low.pages_v.dequantize_into(out.clone())))
    for k, v in packed[1:]:
        assert torch.equal(k, packed[0][0]) and torch.equal(v, packed[0][1])
    spec = small(TokenPolicy()).key
    for rounded, want in ((True, True), (False, False)):
        x = key[:, :, 2:194]
        ref = PagedStore(spec, 32, 32)
        ref.append((x.half() if rounded else x).float())
        assert torch.equal(ref.dequantize_into(torch.empty(1, 2, 192, 64)), packed[0][0]) is want


def test_exact_values_beyond_float16_widen_the_store_with_a_warning() -> None:
    model = tiny()
    cache = SqueezedCache.from_model(model, preset("knorm-50"))
    with torch.no_grad():
        model(ids(150), cache=cache)
    store = stores(cache)[0]
    assert store.exact_dtype == torch.float16
    key, value = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    key[0, 0, 3, 5] = -70000.0
    with pytest.warns(
        RuntimeWarning, match=r"exceed torch.float16 .* keeps its exact tokens in torch.float32"
    ):
        cache.update(key, value, 0)
    assert store.exact_dtype == torch.float32
    window = store.window_k.view()
    assert window.dtype == torch.float32 and window[0, 0, -7, 5] == -70000.0
    assert store.classes[Precision.EXACT].num_tokens == 32  # in the tail, converted (no frozen chunk yet)
    assert {t.dtype for t in exact_tensors(store)} == {torch.float32}
    assert cache.nbytes() == store_tensor_bytes(stores(cache))


@pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")
@pytest.mark.parametrize("name", ["h2o-50", "snapkv-50", "knorm-50", "evict-0.5"])
def test_fused_path_holds_float16_and_reports_held_bytes(name: str) -> None:
    """The fused read path (attention scorers included) stores the same 16-bit exact parts."""
    config = CONFIGS.get(name) or preset(name)
    model = tiny_llama(max_position_embeddings=4096, attn="kvsqueeze")
    cache = held(model, config, 700, 3)
    assert {t.dtype for s in stores(cache) for t in exact_tensors(s)} == {torch.float16}
    assert cache.memory_report().ratio_to_fp16 <= 0.7
