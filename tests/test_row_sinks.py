"""Exact sinks per sequence: in a left-padded batch each row's first real tokens stay exact.

Before, the sinks were the first columns of the batch, i.e. padding for the short rows, whose real
first tokens were quantized like any other.
"""

from __future__ import annotations

import pytest
import torch
from held import reachable_tensor_bytes
from tiny import tiny_llama
from transformers import DynamicCache, LlamaForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.attention.reference import Workspace, materialize
from kvsqueeze.config import CacheConfig, QuantSpec
from kvsqueeze.eval.memory import store_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread", "float_key_dot")
PAD = 0
SMALL_WINDOW = CacheConfig(
    key=QuantSpec(bits=2, axis="channel", group_size=16),
    value=QuantSpec(bits=2, axis="token", group_size=32),
    sink_tokens=4,
    residual_window=16,
    block_size=16,
    page_tokens=64,
)
CONFIGS = {"small-window-k2v2": SMALL_WINDOW, "k4v4": "k4v4", "int8": "int8"}


def tiny(attn: str = "sdpa") -> LlamaForCausalLM:
    return tiny_llama(attn=attn)


def padded_batch(
    lengths: list[int], pad_position: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of random rows, left-padded as generate numbers them
    (padding at position 0 in transformers 5.24, 1 before)."""
    g = torch.Generator().manual_seed(5)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, 128, (n,), generator=g)
        mask[i, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, pad_position)
    return ids, mask, positions


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[40, 300], [300, 40, 7, 299], [302, 300]])
@pytest.mark.parametrize("pad_position", [0, 1])
def test_each_rows_first_real_tokens_are_stored_exact(
    name: str, lengths: list[int], pad_position: int
) -> None:
    model = tiny()
    ids, mask, positions = padded_batch(lengths, pad_position)
    exact, squeezed = DynamicCache(config=model.config), SqueezedCache.from_model(model, CONFIGS[name])
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, cache=exact)
        # a second chunk: the sinks copy must survive later appends
        more = torch.randint(1, 128, (len(lengths), 20))
        more_mask = torch.cat([mask, torch.ones_like(more)], -1)
        more_pos = positions[:, -1:] + 1 + torch.arange(20)
        model(ids, attention_mask=mask, position_ids=positions, cache=squeezed)
        model(more, attention_mask=more_mask, position_ids=more_pos, cache=exact)
        model(more, attention_mask=more_mask, position_ids=more_pos, cache=squeezed)
    width = ids.shape[1]
    for index, layer in enumerate(squeezed.layers):
        empty = torch.empty(len(lengths), 2, 0, 64)
        keys, values = materialize(layer.store, empty, empty, Workspace())
        ref_k, ref_v = exact.layers[index].keys, exact.layers[index].values
        for row, n in enumerate(lengths):
            start = width - n
            real = slice(start, start + min(4, n))
            # exact up to the storage dtype of exact parts (float16 for this float32 model)
            half = layer.store.exact_dtype
            torch.testing.assert_close(
                keys[row, :, real], ref_k[row, :, real].to(half).float(), rtol=0, atol=0
            )
            torch.testing.assert_close(
                values[row, :, real], ref_v[row, :, real].to(half).float(), rtol=0, atol=0
            )
        assert layer.store.nbytes == store_tensor_bytes([layer.store])


def test_fused_path_reads_the_row_sinks_like_the_reference_path() -> None:
    ids, mask, positions = padded_batch([40, 300, 120])
    logits = {}
    for attn in ("sdpa", "kvsqueeze"):
        model = tiny(attn)
        cache = SqueezedCache.from_model(model, SMALL_WINDOW)
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=positions, cache=cache)
            step = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(1))
            out = model(
                step,
                attention_mask=torch.cat([mask, torch.ones_like(step)], -1),
                position_ids=positions[:, -1:] + 1,
                cache=cache,
            )
        assert cache.fused == (attn == "kvsqueeze")
        logits[attn] = out.logits
    torch.testing.assert_close(logits["kvsqueeze"], logits["sdpa"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["k2v2-keep10-knorm", "knorm-50"])
def test_token_policies_refuse_left_padded_batches(name: str) -> None:
    model = tiny()
    ids, mask, _ = padded_batch([30, 50])
    cache = SqueezedCache.from_model(model, name)
    with pytest.raises(ValueError, match="left-padded batch with a token-policy cache"):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False)
    assert cache.get_seq_length() == 0
    # unpadded batches are fine
    model.generate(
        ids[:, -30:], cache=SqueezedCache.from_model(model, name), max_new_tokens=3, do_sample=False
    )


@pytest.mark.parametrize("name", ["k4v4", "int8"])
def test_generate_keeps_the_padded_rows_sinks_exact(name: str) -> None:
    """Through ``generate`` (which numbers the padding itself): the short row's real first tokens."""
    model = tiny()
    ids, mask, _ = padded_batch([300, 40])
    exact, squeezed = DynamicCache(config=model.config), SqueezedCache.from_model(model, name)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=exact, max_new_tokens=3, do_sample=False)
        model.generate(ids, attention_mask=mask, cache=squeezed, max_new_tokens=3, do_sample=False)
    layer = squeezed.layers[0]
    assert layer.store.row_sinks.starts.tolist() == [0, 260]
    empty = torch.empty(2, 2, 0, 64)
    keys, _ = materialize(layer.store, empty, empty, Workspace())
    expected = exact.layers[0].keys[1, :, 260:264].to(layer.store.exact_dtype).float()
    torch.testing.assert_close(keys[1, :, 260:264], expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["k2v2-keep10-knorm", "knorm-50"])
@pytest.mark.parametrize("positions", ["absent", "one row"])
def test_token_policies_refuse_a_left_padded_batch_fed_by_hand(name: str, positions: str) -> None:
    """Called as ``model(ids, attention_mask=mask)``: the model numbers positions itself (one row for
    the whole batch), so only the mask says which rows are padded."""
    model = tiny()
    ids, mask, _ = padded_batch([30, 50])
    cache = SqueezedCache.from_model(model, name)
    extra = {} if positions == "absent" else {"position_ids": torch.arange(ids.shape[1])[None]}
    with torch.no_grad(), pytest.raises(ValueError, match="left-padded batch with a token-policy cache"):
        model(ids, attention_mask=mask, cache=cache, **extra)
    assert cache.get_seq_length() == 0
    with torch.no_grad():  # a mask of ones is no padding
        model(ids, attention_mask=torch.ones_like(mask), cache=cache)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("name", ["k4v4", "none", "small-window-k2v2"])
@pytest.mark.parametrize("first, second", [([20, 60], [60, 20]), ([20, 60], [30, 60]), ([60, 60], [30, 60])])
def test_a_cache_refuses_another_batch_of_the_same_size_until_reset(
    name: str, first: list[int], second: list[int]
) -> None:
    """The rows' starts of the held columns are the cache's; a mask that puts them elsewhere is
    another batch, refused before anything changes (before: its starts replaced the held ones).
    (A batch without padding comes without a mask from ``generate``: its position ids alone cannot
    tell it from the next turn of the held batch.)"""
    model = tiny()
    config = CONFIGS.get(name, name)
    cache = SqueezedCache.from_model(model, config)
    ids, mask, _ = padded_batch(first)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False)
    held, before = cache.get_seq_length(), cache.nbytes()
    starts = [layer.store.row_sinks.starts for layer in cache.layers]
    other, other_mask, _ = padded_batch(second)
    longer = torch.cat([other, torch.full((2, held + 5 - other.shape[1]), 7)], -1)
    longer_mask = torch.cat([other_mask, torch.ones(2, held + 5 - other.shape[1], dtype=torch.long)], -1)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"attention_mask: rows start at columns .*cache.reset"),
    ):
        model.generate(longer, attention_mask=longer_mask, cache=cache, max_new_tokens=2, do_sample=False)
    assert cache.get_seq_length() == held and cache.nbytes() == before
    for layer, known in zip(cache.layers, starts, strict=True):
        kept = layer.store.row_sinks.starts
        assert (kept is None and known is None) or torch.equal(kept, known)
    cache.reset()
    with torch.no_grad():
        model.generate(longer, attention_mask=longer_mask, cache=cache, max_new_tokens=2, do_sample=False)
    assert cache.nbytes() == reachable_tensor_bytes(cache)


@pytest.mark.parametrize("name", ["k4v4", "small-window-k2v2"])
def test_the_same_batch_continues_on_its_cache(name: str) -> None:
    """Its next turn (the held columns as they were, then more tokens) is accepted, and each layer
    holds its own copy of the starts: the reported bytes are the bytes held."""
    model = tiny()
    cache = SqueezedCache.from_model(model, CONFIGS[name])
    ids, mask, _ = padded_batch([20, 100])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False)
        more = torch.cat([out, torch.full((2, 4), 9)], -1)
        more_mask = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=torch.long)], -1)
        model.generate(more, attention_mask=more_mask, cache=cache, max_new_tokens=3, do_sample=False)
    assert cache.layers[0].store.row_sinks.starts.tolist() == [80, 0]
    assert cache.nbytes() == reachable_tensor_bytes(cache)
