"""`KVPool` and `PrefixCache`: block pools shared by several caches, and prefix reuse over them.

`KVPool` holds one `BlockPool` per (layer, keys | values, format); every `SqueezedCache` built with
``pool=`` takes its blocks there, so sequences that share a prompt prefix can share its blocks.

`PrefixCache` (vLLM's automatic prefix caching, over quantized blocks): a sequence is ``sinks |
full blocks | exact tail``; the k-th full block is keyed by a chained hash
``sha256(parent hash, token ids of the block, digest)`` whose root is the hash of the sink tokens,
and the digest names the cache config, the model and the exact dtype. An entry holds, for every
layer, the ids of that block in its key and value pools (and the root entry a copy of each
layer's sink tokens, which are exact and tiny). Entries hold no reference: a block whose last
user released it stays free *with its content* and is found again until the pool hands it out for
other tokens (least recently freed first, a sequence's tail blocks before its head), which
evicts the entry (`BlockPool.on_reuse`).

What is never shared: blocks whose content depends on later tokens (token policies that place by
importance or evict), rows of a padded batch, and anything of a cache without ``pool=``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.spec import QuantSpec
from .block_pool import BlockPool

PoolKey = tuple[int, str, QuantSpec | None, int]  # (layer, "keys" | "values", spec, block_size)


def chain_hash(parent: bytes | None, tokens: Sequence[int], digest: bytes) -> bytes:
    """The hash of a block of ``tokens`` following the block hashed ``parent`` (None: the root)."""
    h = hashlib.sha256(parent or b"root")
    h.update(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes())
    h.update(digest)
    return h.digest()


@dataclass
class PrefixEntry:
    """One cached block: per layer index, its (key block id, value block id); the root entry holds
    each layer's sink tokens ((1, kv_heads, sinks, head_dim) keys and values) instead. ``tokens``:
    the ids the entry's hash covers (what a prefix-blocks file saves to hash them again)."""

    blocks: dict[int, tuple[int, int]]
    sinks: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    parent: bytes | None = None  # the hash this block's hash chains from (a root for block 0)
    tokens: tuple[int, ...] = ()  # the token ids hashed: the block's (the sink tokens for a root)

    @property
    def nbytes(self) -> int:
        if not self.sinks:
            return 0
        return sum(t.numel() * t.element_size() for pair in self.sinks.values() for t in pair)


class PrefixCache:
    """Chained block hashes -> `PrefixEntry`; a block handed out again evicts its entries."""

    def __init__(self) -> None:
        self.entries: dict[bytes, PrefixEntry] = {}
        self._by_block: dict[tuple[int, int], set[bytes]] = {}  # (id(pool), block) -> hashes
        self._children: dict[bytes, int] = {}  # root hash -> cached first blocks chaining from it
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> PrefixEntry | None:
        return self.entries.get(key)

    def put(self, key: bytes, entry: PrefixEntry, pools: dict[int, tuple[BlockPool, BlockPool]]) -> None:
        """Record ``entry`` under ``key`` (kept: an existing entry of the same key wins). A root
        (``entry.sinks``, no blocks) lives as long as some cached first block chains from it."""
        if key in self.entries:
            return
        self.entries[key] = entry
        if entry.parent in self._children:
            self._children[entry.parent] += 1
        if entry.sinks is not None:
            self._children[key] = 0
        for layer, (k, v) in entry.blocks.items():
            kp, vp = pools[layer]
            self._by_block.setdefault((id(kp), k), set()).add(key)
            self._by_block.setdefault((id(vp), v), set()).add(key)

    def forget(self, pool: BlockPool, block: int) -> None:
        """``block`` of ``pool`` is handed out for other tokens: drop the entries that hold it."""
        for key in self._by_block.pop((id(pool), block), ()):
            entry = self.entries.pop(key, None)
            root = None if entry is None else entry.parent
            if root in self._children:
                self._children[root] -= 1
                if self._children[root] == 0:  # no cached first block chains from it any more
                    del self._children[root]
                    self.entries.pop(root, None)

    @property
    def nbytes(self) -> int:
        """Bytes held by entries themselves (the sink copies of root entries)."""
        return sum(e.nbytes for e in self.entries.values())


class KVPool:
    """Block pools of all layers, shared by the caches built with ``pool=`` (one model, one config
    per pool key; several configs may share a KVPool, each gets its own pools)."""

    def __init__(self) -> None:
        self.pools: dict[PoolKey, BlockPool] = {}
        self.prefix = PrefixCache()
        self.model: dict[str, object] = {}  # what the caches on this pool must agree on (`bind`)

    def bind(self, **fields: object) -> None:
        """Tie the pool to one model: the first cache fixes ``fields`` (layers, KV heads, head_dim,
        dtype); a cache of another model raises ValueError naming the field (its blocks would not
        fit, or would mix dtypes)."""
        for name, value in fields.items():
            held = self.model.setdefault(name, value)
            if held != value:
                raise ValueError(
                    f"pool: this KVPool serves a model with {name} {held}, this one has {value}; allowed: "
                    "one model (and dtype) per KVPool — build another KVPool for this model"
                )

    def pool(self, key: PoolKey, per_slab: int, name: str) -> BlockPool:
        """The pool of ``key`` = (layer, kind, spec, block_size), created on first use."""
        if key not in self.pools:
            pool = BlockPool(key[2], key[3], per_slab, name=name)
            pool.on_reuse = lambda block, pool=pool: self.prefix.forget(pool, block)
            self.pools[key] = pool
        return self.pools[key]

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools.values())

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self.pools.values())

    @property
    def nbytes(self) -> int:
        """Bytes held: every pool's blocks (used or free) plus the prefix cache's sink copies."""
        return sum(p.nbytes for p in self.pools.values()) + self.prefix.nbytes
