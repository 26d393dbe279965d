"""Exact-state tests of the block pool, block tables and prefix cache (vLLM's prefix-caching style):
free counts, reference counts, tables and hashes after each operation."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.config import QuantSpec
from kvsqueeze.quant.packed import PackedTensor
from kvsqueeze.storage.block_pool import BlockPool, PoolFull
from kvsqueeze.storage.block_table import BlockTables, table_capacity
from kvsqueeze.storage.pages import PagedStore
from kvsqueeze.storage.prefix_cache import KVPool, PrefixCache, PrefixEntry, chain_hash

HEADS, DIM, BS = 2, 64, 16
SPEC = QuantSpec(bits=4, axis="channel", group_size=16)


def _x(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def _refs(pool: BlockPool) -> list[int]:
    return list(pool.refs)


def test_pool_allocates_grows_and_frees_exactly() -> None:
    pool = BlockPool(SPEC, BS, per_slab=3)
    assert (pool.num_blocks, pool.num_free, pool.nbytes, pool.slabs) == (0, 0, 0, [])
    ids = pool.allocate(2, like=_x(1, BS))
    assert ids.tolist() == [0, 1] and _refs(pool) == [1, 1] and pool.num_free == 0
    assert len(pool.slabs) == 1 and pool.slabs[0].codes.shape[0] == 2  # the slab holds just 2 blocks
    per_block = round(BS * SPEC.bytes_per_token(HEADS, DIM))
    assert (
        pool.block_nbytes
        == per_block
        == PackedTensor.empty(1, HEADS, BS, DIM, SPEC, torch.device("cpu")).nbytes
    )
    assert pool.nbytes == 2 * per_block == sum(t.numel() * t.element_size() for t in pool.tensors())
    ids = pool.allocate(3)  # fills slab 0 (grown to 3), then a new slab of 2
    assert ids.tolist() == [2, 3, 4] and [s.codes.shape[0] for s in pool.slabs] == [3, 2]
    assert pool.nbytes == 5 * per_block == sum(t.numel() * t.element_size() for t in pool.tensors())
    pool.decref([3, 1])
    assert _refs(pool) == [1, 0, 1, 0, 1] and list(pool.free) == [3, 1] and pool.num_used == 3
    assert pool.allocate(1).tolist() == [3]  # least recently freed first, no growth
    assert pool.num_blocks == 5 and list(pool.free) == [1]
    pool.incref([1, 1, 0])  # a free block taken back; repeats count
    assert _refs(pool) == [2, 2, 1, 1, 1] and pool.num_free == 0
    with pytest.raises(AssertionError, match="freed twice"):
        pool.decref([4, 4])


def test_pool_bound_raises_pool_full() -> None:
    pool = BlockPool(SPEC, BS, per_slab=4, max_blocks=3)
    pool.allocate(3, like=_x(1, BS))
    with pytest.raises(PoolFull, match="max_blocks 3"):
        pool.allocate(1)
    pool.decref([0])
    assert pool.allocate(1).tolist() == [0]


def test_reuse_evicts_prefix_entries() -> None:
    kv = KVPool()
    kp = kv.pool((0, "keys", SPEC, BS), 4, "k")
    vp = kv.pool((0, "values", SPEC, BS), 4, "v")
    assert kv.pool((0, "keys", SPEC, BS), 4, "k") is kp
    k, v = kp.allocate(2, like=_x(1, BS)), vp.allocate(2, like=_x(1, BS))
    digest = b"cfg"
    h0 = chain_hash(None, [1, 2], digest)
    h1 = chain_hash(h0, list(range(BS)), digest)
    assert h1 != chain_hash(h0, list(range(BS)), b"other") != chain_hash(None, list(range(BS)), digest)
    kv.prefix.put(h1, PrefixEntry({0: (int(k[0]), int(v[0]))}), {0: (kp, vp)})
    kv.prefix.put(h1, PrefixEntry({0: (9, 9)}), {0: (kp, vp)})  # the first entry of a key wins
    assert kv.prefix.get(h1).blocks == {0: (0, 0)} and len(kv.prefix) == 1
    kp.decref(k)
    vp.decref(v)
    assert kv.num_free == 4 and kv.prefix.get(h1) is not None  # freed, still findable
    kp.allocate(1)  # hands out block 0 of the key pool: the entry holding it is gone
    assert kv.prefix.get(h1) is None and len(kv.prefix) == 0


def test_tables_share_blocks_on_batch_ops() -> None:
    """select / reorder / repeat are table operations: no block is copied, references follow rows."""
    store = PagedStore(SPEC, BS, page_tokens=4 * BS)
    x = _x(2, 2 * BS)
    store.append(x)  # rows 0, 1: blocks [[0, 1], [2, 3]]
    assert store.tables.view().tolist() == [[0, 1], [2, 3]] and _refs(store.pool) == [1, 1, 1, 1]
    before = torch.empty(2, HEADS, 2 * BS, DIM)
    store.dequantize_into(before)
    bytes_before = store.pool.nbytes
    store.map_batch(lambda t: t.repeat_interleave(2, dim=0))
    assert store.tables.view().tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert _refs(store.pool) == [2, 2, 2, 2] and store.pool.nbytes == bytes_before  # shared, not copied
    store.map_batch(lambda t: t[torch.tensor([3, 0])])
    assert store.tables.view().tolist() == [[2, 3], [0, 1]] and _refs(store.pool) == [1, 1, 1, 1]
    store.map_batch(lambda t: t[torch.tensor([0])])
    assert _refs(store.pool) == [0, 0, 1, 1] and list(store.pool.free) == [0, 1]
    out = torch.empty(1, HEADS, 2 * BS, DIM)
    assert torch.equal(store.dequantize_into(out), before[1:])
    store.append(_x(1, BS, seed=5))  # reuses a freed block
    assert store.tables.view().tolist() == [[2, 3, 0]] and store.pool.num_blocks == 4
    assert store.tables.ids.shape == (1, table_capacity(3)) == (1, 4)
    store.clear()
    assert store.pool.num_blocks == 0 and store.nbytes == 0


def test_shared_pool_counts_distinct_blocks() -> None:
    pool = BlockPool(SPEC, BS, per_slab=8)
    a, b = PagedStore(SPEC, BS, 8 * BS, pool=pool), PagedStore(SPEC, BS, 8 * BS, pool=pool)
    a.append(_x(1, 3 * BS))
    b.append_blocks(a.tables.view()[:, :2].clone())  # b takes a's first two blocks by reference
    b.append(_x(1, BS, seed=1))
    assert a.tables.view().tolist() == [[0, 1, 2]] and b.tables.view().tolist() == [[0, 1, 3]]
    assert _refs(pool) == [2, 2, 1, 1]
    assert b.nbytes == 3 * pool.block_nbytes + b.tables.nbytes and not a.owns_pool
    a.clear()
    assert _refs(pool) == [1, 1, 0, 1] and list(pool.free) == [2] and pool.num_blocks == 4
    b.clear()
    assert pool.num_free == 4 and list(pool.free) == [2, 3, 1, 0]  # tail first


def test_table_capacity() -> None:
    assert [table_capacity(n) for n in (0, 1, 4, 5, 8, 9, 100)] == [4, 4, 4, 8, 8, 16, 128]
    tables = BlockTables()
    tables.append(torch.zeros(3, 5, dtype=torch.int32))
    assert tables.ids.shape == (3, 8) and tables.nbytes == 3 * 8 * 4 and tables.batch_size == 3


def test_prefix_cache_forget_only_touches_its_pool() -> None:
    cache = PrefixCache()
    p1, p2 = BlockPool(SPEC, BS, 2), BlockPool(SPEC, BS, 2)
    cache.put(b"a", PrefixEntry({0: (0, 0)}), {0: (p1, p2)})
    cache.forget(BlockPool(SPEC, BS, 2), 0)
    assert cache.get(b"a") is not None
    cache.forget(p2, 0)
    assert cache.get(b"a") is None
