"""Verification reads: a forward of several drafts reads what plain one-token decoding would read.

Plain decoding reads one token per forward; the blocks flushed by the tokens before a query are read
quantized. A verification forward (assisted decoding) brings several tokens while the store still
holds the newest exact, so `LayerStore.draft_reads` hands out the quantized copies and the kvsqueeze
attention shows each query the copy plain decoding would show it. Checked here per query against a
store that really received the tokens one by one, on the dense and the fused path, for every kind
of stored format and transform (pre-RoPE keys of ``best-*``), then through ``generate``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny import prompt_ids, tiny_llama

from kvsqueeze import SqueezedCache
from kvsqueeze.attention.dense import dense_attention
from kvsqueeze.attention.fused import fused_attention, fused_backend
from kvsqueeze.attention.parts import DraftReadsWarning, dense_parts, snapshot
from kvsqueeze.attention.reference import Workspace, materialize
from kvsqueeze.config import CacheConfig, QuantSpec, preset, resolve_config
from kvsqueeze.integrations.rope import rope_for
from kvsqueeze.storage.layer import LayerStore
from kvsqueeze.storage.transform import layer_transforms

pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")

SMALL = CacheConfig(
    key=QuantSpec(bits=2, axis="channel", group_size=16),
    value=QuantSpec(bits=2, axis="token", group_size=32),
    sink_tokens=4,
    residual_window=16,
    block_size=16,
    page_tokens=32,
)
CONFIGS = ["k4v4", "k2v2", "int8", "fp8", "best-3bit", "small"]


def config_of(name: str) -> CacheConfig:
    return SMALL if name == "small" else resolve_config(preset(name), head_dim=64)


def store_for(name: str) -> LayerStore:
    config = config_of(name)
    rope, _ = rope_for(tiny_llama(0).config, 64)
    return LayerStore(config, *layer_transforms(config, 64, rope))


def kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 64, generator=g) * 2, torch.randn(1, 2, n, 64, generator=g)


def plain_outputs(store: LayerStore, key, value, query, chunk: int) -> torch.Tensor:
    """(q_len, ...) outputs of plain decoding: the first ``chunk`` tokens in one forward, then one by one."""
    store = copy.deepcopy(store)
    outs = []
    k, v = materialize(store, key[:, :, :chunk], value[:, :, :chunk], Workspace())
    mask = torch.ones(chunk, k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - chunk)[None, None]
    outs.append(dense_attention(query[:, :, :chunk], k, v, mask, 0.125, True)[0])
    store.append(key[:, :, :chunk], value[:, :, :chunk])
    for i in range(chunk, key.shape[-2]):
        k, v = materialize(store, key[:, :, i : i + 1], value[:, :, i : i + 1], Workspace())
        outs.append(dense_attention(query[:, :, i : i + 1], k, v, None, 0.125, True)[0])
        store.append(key[:, :, i : i + 1], value[:, :, i : i + 1])
    return torch.cat(outs, dim=1)


def verification_case(name: str, held: int, new: int, chunk: int) -> tuple:
    """A recording store holding ``held`` tokens, ``new`` tokens with queries, and the outputs plain
    decoding gives them (`plain_outputs`)."""
    store = store_for(name)
    if held:
        store.append(*kv(held, 1))
    key, value = kv(new, 2)
    query = torch.randn(1, 4, new, 64, generator=torch.Generator().manual_seed(3))
    expected = plain_outputs(store, key, value, query, chunk)
    store.record_past = True
    return store, key, value, query, expected


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    ("held", "new", "chunk"), [(0, 300, 250), (0, 200, 200), (150, 40, 1), (137, 6, 1), (2, 70, 3)]
)
def test_each_query_reads_what_plain_decoding_reads(name: str, held: int, new: int, chunk: int) -> None:
    store, key, value, query, expected = verification_case(name, held, new, chunk)
    drafts = store.draft_reads(key, value, chunk)
    keys, values = materialize(store, key, value, Workspace())
    parts = dense_parts(keys, values, new, Workspace(), drafts) if drafts else None
    if parts is None:  # nothing flushed before the last query: every query reads the store as it is
        mask = torch.ones(new, keys.shape[-2], dtype=torch.bool).tril(keys.shape[-2] - new)[None, None]
        got = dense_attention(query, keys, values, mask, 0.125, True)[0]
    else:
        k, v, mask = parts.dense_inputs(None)
        got = dense_attention(query, k, v, mask, 0.125, True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the store itself is unchanged by the preview
    store.settle()


@pytest.mark.skipif(fused_backend(torch.device("cpu")) is None, reason="native kernel not built")
@pytest.mark.parametrize("name", ["k4v4", "k2v2", "int8", "small"])
@pytest.mark.parametrize(("held", "new", "chunk"), [(0, 300, 250), (150, 40, 1), (137, 6, 1), (2, 70, 3)])
def test_the_fused_kernel_reads_what_plain_decoding_reads(name: str, held: int, new: int, chunk: int) -> None:
    store, key, value, query, expected = verification_case(name, held, new, chunk)
    drafts = store.draft_reads(key, value, chunk)
    parts = snapshot(store, key, value, Workspace(), drafts)
    got = fused_attention(query, parts, None, 0.125, True, fused_backend(torch.device("cpu")))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_nothing_to_read_differently_when_no_block_is_flushed(name: str) -> None:
    store = store_for(name)
    store.append(*kv(10, 1))
    assert store.draft_reads(*kv(3, 2), chunk=1) is None  # 13 tokens: within sinks and window
    assert store.draft_reads(*kv(300, 2), chunk=300) is None  # one chunk reads the store as it is


@pytest.mark.parametrize("config", ["k2v2", "best-2bit", SMALL], ids=["k2v2", "best-2bit", "small"])
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_low_bit_assisted_decoding_matches_plain_greedy(config: object, mode: str) -> None:
    """2-bit caches flip argmaxes of this random model wherever a draft read a block exact that plain
    decoding reads quantized (the first prompt-lookup forward already does, past a 128-token window)."""
    model = tiny_llama(0, attn="kvsqueeze")
    ids = prompt_ids(200)
    kwargs = dict(max_new_tokens=60, do_sample=False)
    extra = {"prompt_lookup_num_tokens": 5} if mode == "prompt_lookup" else {"assistant_model": tiny_llama(1)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", DraftReadsWarning)
        plain = model.generate(ids, cache=SqueezedCache.from_model(model, config), **kwargs)
        assisted = model.generate(ids, cache=SqueezedCache.from_model(model, config), **extra, **kwargs)
    assert torch.equal(assisted, plain)


def test_another_attention_is_warned_that_drafts_read_exact_tokens() -> None:
    model = tiny_llama(0)  # sdpa: it cannot show each query its own copy
    with torch.no_grad(), pytest.warns(DraftReadsWarning, match="attn_implementation='kvsqueeze'"):
        model.generate(
            prompt_ids(200), cache=SqueezedCache.from_model(model, "k2v2"), prompt_lookup_num_tokens=5,
            max_new_tokens=20, do_sample=False,
        )  # fmt: skip
