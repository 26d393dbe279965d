"""Prefix sharing for `SqueezedCache`s built on one `KVPool` (``from_model(..., pool=pool)``).

A cache of one sequence (batch 1) follows its token ids (the model's forward hooks see them) and,
after every forward, publishes its full packed blocks to the pool's `PrefixCache` under chained
hashes (`storage.prefix_cache`). A new cache on the same pool calls `match_prefix(input_ids)`
before its prefill: it takes the longest run of cached blocks of the prompt by reference (plus
the sink tokens of the root entry) and reports how many prompt tokens it now holds; the model then
runs only on the rest (``model.generate(input_ids, cache=cache)`` does this by itself: it skips
the tokens a cache already holds).

The tokens a hit replaces were computed by another sequence whose attention read the same
tokens; a recomputation reads them in another chunking, so logits agree to float rounding and to
what quantization does to later tokens, not bit for bit (as in vLLM with a quantized cache).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from ..storage.layer import LayerStore
from ..storage.prefix_cache import PrefixEntry, chain_hash

if TYPE_CHECKING:
    from .cache import SqueezedCache


def prefix_digest(cache_config: Any, model_config: Any, model: Any = None) -> bytes:
    """What a block's content depends on besides its tokens: the cache config and the model (its
    name or path, type and sizes; with ``model``, also its parameters' dtype and a fingerprint of
    its first and last weights, so two models of one config, or one model cast to another dtype,
    never take each other's blocks)."""
    text = model_config.get_text_config(decoder=True)
    described = {
        k: str(getattr(text, k, None) or getattr(model_config, k, None))
        for k in ("_name_or_path", "model_type", "num_hidden_layers", "hidden_size", "vocab_size", "dtype")
    }
    blob = json.dumps({"cache": cache_config.to_dict(), "model": described}, sort_keys=True, default=str)
    h = hashlib.sha256(blob.encode())
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    for p in params[:1] + params[-1:]:
        h.update(f"{p.dtype} {tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.digest()


def release_blocks(stores: list[LayerStore]) -> None:
    """Give the blocks of ``stores`` back to their (shared) pools: a cache on a `KVPool` that is
    dropped without `reset` (its finalizer calls this)."""
    for store in stores:
        for packed in (store.packed_k, store.packed_v):
            packed.tables.release(packed.pool)


def _stores(cache: SqueezedCache) -> dict[int, LayerStore]:
    from .cache import SqueezedLayer

    return {
        i: layer.store
        for i, layer in enumerate(cache.layers)
        if isinstance(layer, SqueezedLayer) and layer.store.positional
    }


def shareable(cache: SqueezedCache) -> bool:
    """Whether ``cache`` can publish and take blocks: a shared pool, and every full-attention layer a
    plain store (no token policy); `publish` also skips batches, padded rows and pending drafts."""
    stores = _stores(cache)
    return (
        cache.kv_pool is not None
        and bool(stores)
        and len(stores) == sum(1 for layer in cache.layers if hasattr(layer, "store"))
    )


def note_tokens(cache: SqueezedCache, input_ids: Any) -> None:
    """Follow the token ids of a forward (called by the forward pre-hook, before the update)."""
    if cache.token_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        cache.token_ids = None  # embeddings, or a batch: not followed from now on
        return
    if len(cache.token_ids) != cache.get_seq_length():
        cache.token_ids = None
        return
    cache.token_ids += input_ids[0].tolist()


def publish(cache: SqueezedCache) -> int:
    """Register the full blocks not yet published (called after every forward); returns how many."""
    if cache.token_ids is None or not shareable(cache):
        return 0
    stores = _stores(cache)
    first = next(iter(stores.values()))
    if (
        first.batch_size != 1
        or first.pending_k.num_tokens
        or first.row_sinks.view(first.num_tokens) is not None
    ):
        return 0
    if len(cache.token_ids) != first.num_tokens:
        return 0
    sinks, bs = first.policy.sink_tokens, first.packed_k.block_size
    blocks = min(s.packed_k.tables.num_blocks for s in stores.values())
    prefix, pools = cache.kv_pool.prefix, _pools(stores)
    ids = cache.token_ids
    new = 0
    for j in range(cache.published, blocks):
        key = chain_hash(cache.last_hash, ids[sinks + j * bs : sinks + (j + 1) * bs], cache.prefix_digest)
        entry = {
            i: (int(s.packed_k.tables.ids[0, j]), int(s.packed_v.tables.ids[0, j])) for i, s in stores.items()
        }
        if j == 0:  # the root: each layer's sink tokens, kept while a cached first block chains from it
            root = chain_hash(None, ids[:sinks], cache.prefix_digest)
            copies = {
                i: (s.sink_k.view().clone(), s.sink_v.view().clone()) for i, s in stores.items() if sinks
            }
            prefix.put(root, PrefixEntry({}, copies, tokens=tuple(ids[:sinks])), pools)
            cache.last_hash = root
            key = chain_hash(root, ids[sinks : sinks + bs], cache.prefix_digest)
        tokens = tuple(ids[sinks + j * bs : sinks + (j + 1) * bs])
        prefix.put(key, PrefixEntry(entry, parent=cache.last_hash, tokens=tokens), pools)
        cache.last_hash = key
        new += 1
    cache.published = blocks
    return new


def _pools(stores: dict[int, LayerStore]) -> dict:
    return {i: (s.packed_k.pool, s.packed_v.pool) for i, s in stores.items()}


def match_prefix(cache: SqueezedCache, input_ids: torch.Tensor) -> int:
    """Take the cached blocks of the longest cached prefix of ``input_ids`` (1, n): the cache then
    holds those tokens (the sinks and the full blocks; at least one prompt token is left to compute).
    Returns the number of tokens held. Raises ValueError for a cache that holds tokens, a batch, or
    a cache without a shared pool."""
    if cache.kv_pool is None:
        raise ValueError(
            "match_prefix: this cache has no shared pool; build it with from_model(..., pool=KVPool())"
        )
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.shape[0] != 1
        or input_ids.is_floating_point()
        or input_ids.is_complex()
    ):
        what = (
            f"{tuple(input_ids.shape)} {input_ids.dtype}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(
            f"match_prefix: input_ids {what}; allowed: (1, tokens) integer token ids, one sequence"
        )
    if cache.get_seq_length():
        raise ValueError(
            f"match_prefix: the cache already holds {cache.get_seq_length()} tokens; allowed: an empty cache "
            "(call cache.reset() first)"
        )
    if not shareable(cache):
        return 0
    stores = _stores(cache)
    first = next(iter(stores.values()))
    sinks, bs = first.policy.sink_tokens, first.packed_k.block_size
    ids = input_ids[0].tolist()
    prefix = cache.kv_pool.prefix
    prefix.queries += max(0, (len(ids) - 1 - sinks) // bs)
    root_key = chain_hash(None, ids[:sinks], cache.prefix_digest)
    root = prefix.get(root_key)
    if root is None or len(ids) <= sinks:
        return 0
    key, found = root_key, []
    while sinks + (len(found) + 1) * bs < len(ids):  # leave at least one token to compute
        nxt = chain_hash(
            key, ids[sinks + len(found) * bs : sinks + (len(found) + 1) * bs], cache.prefix_digest
        )
        entry = prefix.get(nxt)
        if entry is None:
            break
        found.append(entry)
        key = nxt
    if not found:
        return 0
    prefix.hits += len(found)
    for i, store in stores.items():
        if sinks:
            k, v = root.sinks[i]
            store.sink_k.append(k)
            store.sink_v.append(v)
        table_k = torch.tensor([[e.blocks[i][0] for e in found]], dtype=torch.int32)
        table_v = torch.tensor([[e.blocks[i][1] for e in found]], dtype=torch.int32)
        store.packed_k.append_blocks(table_k)
        store.packed_v.append_blocks(table_v)
    held = sinks + len(found) * bs
    cache.token_ids = ids[:held]
    cache.published, cache.last_hash = len(found), key
    return held
