"""A left-padded batch in one cache holds no blocks of padding.

Rows of a padded batch share columns; the short rows' leading columns are padding, which the
attention mask hides. Blocks that hold only padding point at a block stored beside them (or the
pool's null block of zeros) instead of taking storage, so a padded batch holds about what its rows
hold in caches of their own: at most the partly padded block, the sinks and the window of padding
per row more.
"""

from __future__ import annotations

import pytest
import torch
from held import reachable_tensor_bytes
from test_row_sinks import SMALL_WINDOW, padded_batch, tiny
from transformers import DynamicCache

from kvsqueeze import SqueezedCache
from kvsqueeze.eval.memory import store_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
PRESETS = {"small-window-k2v2": SMALL_WINDOW, "k4v4": "k4v4", "int8": "int8", "none": "none"}
LENGTHS = [[20, 300], [300, 40, 7, 299], [302, 300], [1, 500]]


def prefill(
    name: str, lengths: list[int], steps: int = 3, width: int | None = None, chunk: int | None = None
) -> SqueezedCache:
    """A cache after a padded prefill of rows of ``lengths`` (left-padded to ``width``: default the
    longest, as a tokenizer pads; wider as ``padding="max_length"`` does; in chunks of ``chunk``
    columns) and ``steps`` decode steps."""
    model = tiny()
    ids, mask, positions = padded_batch(lengths)
    if width is not None:  # every row padded
        extra = width - ids.shape[1]
        ids, mask = (torch.nn.functional.pad(t, (extra, 0)) for t in (ids, mask))
        positions = torch.nn.functional.pad(positions, (extra, 0))
    cache = SqueezedCache.from_model(model, PRESETS[name])
    with torch.no_grad():
        chunk = chunk or ids.shape[1]
        for c in range(0, ids.shape[1], chunk):
            part = slice(c, c + chunk)
            model(
                ids[:, part],
                attention_mask=mask[:, : c + chunk],
                position_ids=positions[:, part],
                cache=cache,
            )
        for i in range(steps):
            step = torch.full((len(lengths), 1), 3)
            mask = torch.cat([mask, torch.ones_like(step)], -1)
            model(step, attention_mask=mask, position_ids=positions[:, -1:] + 1 + i, cache=cache)
    return cache


def real_blocks(store) -> int:
    """Blocks of ``store``'s history that hold a token of their row: those ending after the row's start."""
    starts = store.row_sinks.starts
    sinks, bs = store.policy.sink_tokens, store.policy.block_size
    ends = sinks + bs * torch.arange(1, store.placement.num_tokens // bs + 1)
    return int((ends[None, :] > starts[:, None]).sum())


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("wider", [0, 200])
@pytest.mark.parametrize("chunk", [None, 64])
def test_blocks_of_padding_take_no_storage(
    name: str, lengths: list[int], wider: int, chunk: int | None
) -> None:
    cache = prefill(name, lengths, width=max(lengths) + wider if wider else None, chunk=chunk)
    for layer in cache.layers:
        store = layer.store
        for pages in (store.packed_k, store.packed_v):
            if not pages.num_tokens:
                continue
            table, pool = pages.tables.view(), pages.pool
            real = real_blocks(store)
            # blocks of padding point at a block stored beside them, or at the null block when every
            # row is padding there: only the real blocks (and the null block) take storage. A chunk
            # of a row that is all position 0 may end with its first real token: its blocks are kept.
            null = pool._null
            if chunk is None:
                assert int(table.unique().numel()) == real + (null is not None)
                assert pool.num_used == real + (null is not None)
            else:
                assert pool.num_used >= real
            if null is not None:
                for t in pool.slabs[null // pool.per_slab].tensors():
                    assert not bool(t[null % pool.per_slab].any())  # zeros: every format reads 0.0
        assert store.nbytes == store_tensor_bytes([store])  # the row starts included


@pytest.mark.parametrize("name", ["k4v4", "small-window-k2v2", "none"])
def test_a_padded_batch_holds_about_what_its_rows_hold_alone(name: str) -> None:
    lengths = [20, 500]
    together = prefill(name, lengths).nbytes()
    alone = sum(prefill(name, [n]).nbytes() for n in lengths)
    store = prefill(name, lengths).layers[0].store
    # the short row keeps at most its partly padded block, sinks and window of padding more
    bs, window, sinks = store.policy.block_size, store.window.num_tokens, store.policy.sink_tokens
    itemsize = torch.empty(0, dtype=store.exact_dtype or torch.float32).element_size()
    exact_bytes_per_token = 2 * 2 * 64 * itemsize  # keys and values, 2 KV heads, head_dim 64
    null_blocks = store.packed_k.pool.block_nbytes + store.packed_v.pool.block_nbytes
    per_layer = (bs + window + sinks) * exact_bytes_per_token + null_blocks + 4096  # + tables, row starts
    assert together <= alone + len(prefill(name, lengths).layers) * per_layer, (together, alone)


@pytest.mark.parametrize("wider", [0, 150])
def test_padded_rows_read_what_an_exact_cache_reads(wider: int) -> None:
    """Blocks of padding are masked: every row's logits equal those over a DynamicCache of the batch
    (preset none keeps everything exact, so the only difference could be the padding's content),
    also when every row is padded (the null block)."""
    model = tiny()
    ids, mask, positions = padded_batch([20, 300, 77])
    ids, mask, positions = (torch.nn.functional.pad(t, (wider, 0)) for t in (ids, mask, positions))
    exact, squeezed = DynamicCache(config=model.config), SqueezedCache.from_model(model, "none")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, cache=exact)
        model(ids, attention_mask=mask, position_ids=positions, cache=squeezed)
        for i in range(3):
            step = torch.tensor([[5], [6], [7]]) + i
            mask = torch.cat([mask, torch.ones_like(step)], -1)
            where = positions[:, -1:] + 1 + i
            a = model(step, attention_mask=mask, position_ids=where, cache=exact).logits
            b = model(step, attention_mask=mask, position_ids=where, cache=squeezed).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "kvsqueeze"])
def test_generate_beam_search_and_reset_with_null_blocks(attn: str) -> None:
    """Batch operations (beam search repeats and reorders rows) count the null block's references;
    a reset gives every block back."""
    model = tiny(attn=attn)
    ids, mask, _ = padded_batch([20, 300])
    cache = SqueezedCache.from_model(model, SMALL_WINDOW)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, cache=cache, max_new_tokens=20, do_sample=False, num_beams=2
        )
    assert out.shape == (2, 320)
    store = cache.layers[0].store
    assert store.nbytes == store_tensor_bytes([store])
    assert cache.nbytes() == reachable_tensor_bytes(cache)  # each layer's row starts its own
    cache.reset()
    assert store.packed_k.pool.num_used == 0


def test_rows_all_padded_where_blocks_leave_the_window_use_the_null_block() -> None:
    """Rows padded to a fixed length (``padding="max_length"``), prefilled in chunks: the blocks
    leaving the window at the first chunk are padding in every row, so they point at the null block."""
    cache = prefill("k4v4", [20, 30], width=400, chunk=128)
    store = cache.layers[0].store
    pool = store.packed_k.pool
    assert pool._null is not None and pool.num_used == 1 + real_blocks(store)
    assert bool((store.packed_k.tables.view()[:, 0] == pool._null).all())
    assert cache.memory_report().padding_tokens == 380 + 370


@pytest.mark.parametrize("name", ["k4v4", "none", "small-window-k2v2"])
def test_a_single_left_padded_row(name: str) -> None:
    """A batch of one padded row (``padding="max_length"``): its start is its own (position ids of one
    row are that row's), generate runs, blocks of padding are not stored, and with preset none the
    logits equal a DynamicCache's."""
    model = tiny()
    ids, mask, _ = padded_batch([40])
    ids, mask = (torch.nn.functional.pad(t, (260, 0)) for t in (ids, mask))
    exact, squeezed = DynamicCache(config=model.config), SqueezedCache.from_model(model, PRESETS[name])
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, cache=exact, max_new_tokens=6, do_sample=False)
        b = model.generate(ids, attention_mask=mask, cache=squeezed, max_new_tokens=6, do_sample=False)
    store = squeezed.layers[0].store
    assert store.row_sinks.starts.tolist() == [260]
    assert store.packed_k.pool.num_used <= real_blocks(store) + 1
    assert squeezed.memory_report().padding_tokens == 260
    if name == "none":
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["k4v4", "small-window-k2v2", "int8"])
@pytest.mark.parametrize("attn", ["sdpa", "kvsqueeze"])
def test_the_pad_token_does_not_change_a_rows_answer(name: str, attn: str) -> None:
    """A block that is partly padding quantizes with its real tokens' scales alone (the padding is
    replaced by the row's first real token before quantizing): the logits are the same whatever the
    pad token id."""
    model = tiny(attn)
    logits = []
    for pad in (0, 7, 100):
        ids, mask, positions = padded_batch([70, 300])
        ids = ids.masked_fill(mask == 0, pad)
        cache = SqueezedCache.from_model(model, PRESETS[name])
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=positions, cache=cache)
            step = torch.tensor([[5], [6]])
            mask = torch.cat([mask, torch.ones_like(step)], -1)
            out = model(step, attention_mask=mask, position_ids=positions[:, -1:] + 1, cache=cache).logits
        logits.append(out)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("name", ["k4v4", "none"])
@pytest.mark.parametrize("pad_position", [0, 1])
def test_chunked_prefill_of_a_padded_batch_takes_starts_from_the_mask(name: str, pad_position: int) -> None:
    """Chunks of a padded batch fed by hand (attention mask and position ids, padding numbered 0 or 1):
    the row starts come from the 2-D attention mask the model's forward receives, so no block of
    padding is stored even while a chunk is all padding; the cache holds what one forward leaves."""
    model = tiny()
    ids, mask, positions = padded_batch([20, 600], pad_position)
    whole = SqueezedCache.from_model(model, PRESETS[name])
    chunked = SqueezedCache.from_model(model, PRESETS[name])
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, cache=whole)
        for c in range(0, ids.shape[1], 128):
            part = slice(c, c + 128)
            model(
                ids[:, part],
                attention_mask=mask[:, : c + 128],
                position_ids=positions[:, part],
                cache=chunked,
            )
    store = chunked.layers[0].store
    assert store.row_sinks.starts.tolist() == [580, 0]
    assert store.packed_k.pool.num_used <= real_blocks(store) + 1
    assert chunked.nbytes() <= whole.nbytes() + 2 * store.packed_k.pool.block_nbytes * len(chunked.layers) * 2


@pytest.mark.parametrize("lengths, width", [([20, 300], None), ([20], 200)])
def test_the_report_says_its_counts_are_columns_of_a_padded_batch(
    lengths: list[int], width: int | None
) -> None:
    report = prefill("k4v4", lengths, steps=3, width=width).memory_report()
    columns = (width or max(lengths)) + 3
    assert report.num_tokens == columns
    assert report.real_tokens == sum(lengths) + 3 * len(lengths)
    assert report.padding_tokens == columns * len(lengths) - report.real_tokens
    rows = f"{len(lengths)} row{'s' if len(lengths) > 1 else ''}"
    assert report.describe().endswith(
        f"; a left-padded batch: these counts are the columns its rows share, and {report.padding_tokens} of "
        "them over the rows are padding, not tokens (blocks of only padding are not stored; "
        f"{report.real_tokens} tokens held over the {rows})"
    )
