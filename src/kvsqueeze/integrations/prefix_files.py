"""Prefix-block files: a `KVPool`'s prefix cache saved to a safetensors file and loaded back.

The prefix cache (`storage.prefix_cache`) keys each published block by a chained hash of its token
ids; its entries form trees (a root per distinct run of sink tokens, then one entry per block). A
file keeps, for the entries of one cache config and model (those whose hash recomputes from their
token ids and that config's digest, reachable from a root), in parents-first order: each entry's
token ids and parent, every layer's key and value blocks (packed as the pool holds them), and each
root's sink tokens. Loading computes the hashes again with the loading pool's digest, copies the
blocks of entries it does not hold yet into newly allocated blocks, registers the entries and
frees the blocks (tails first): like the blocks of a finished request, they stay findable by
`SqueezedCache.match_prefix` until the pool hands them out for other tokens.

The header carries the cache config, the model fingerprint and the format version of
`storage.persist`; files of another model, config or version, truncated or damaged, are refused with
`CacheFileError` (see `prompt_cache`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch

from ..config import CacheConfig
from ..storage.persist import CacheFileError, read_file, write_file
from ..storage.prefix_cache import KVPool, PrefixEntry, chain_hash
from ..storage.state import StateDict, StateError, put_blocks, spec_from_state, spec_state, take_blocks
from .cache import SqueezedCache
from .fingerprint import config_differences, differences, model_fingerprint
from .prefix import _stores, prefix_digest, shareable
from .prompt_cache import _device, _plain, _saved_config

KIND = "kvsqueeze.prefix_blocks"


def _probe(pool: KVPool, model: Any, config: str | CacheConfig | dict) -> SqueezedCache:
    """An empty cache on ``pool`` for ``model`` and ``config``: its layers' pools and its digest."""
    if not isinstance(pool, KVPool):
        raise ValueError(f"pool: {type(pool).__name__}; allowed: a kvsqueeze.KVPool")
    resolved = SqueezedCache.resolve(config, model.config)
    if resolved.tokens is not None:
        raise ValueError(
            "config: a token policy (CacheConfig.tokens) places tokens by what follows them, so its blocks are "
            "never shared and there are no prefix blocks to save or load; allowed: a config without tokens"
        )
    if isinstance(model, torch.nn.Module):
        pool.bind(dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    cache = SqueezedCache(resolved, model.config, fused=False, pool=pool)
    if not shareable(cache):
        raise ValueError("model: no full-attention layer keeps packed blocks; there are no prefix blocks")
    cache.prefix_digest = prefix_digest(cache.cache_config, model.config, model)
    return cache


def _entries(pool: KVPool, digest: bytes) -> list[tuple[bytes, PrefixEntry, int]]:
    """(hash, entry, parent index or -1) of the entries made with ``digest``, parents first."""
    kids: dict[bytes, list[tuple[bytes, PrefixEntry]]] = defaultdict(list)
    roots = []
    for key, entry in pool.prefix.entries.items():
        if entry.sinks is not None:
            if chain_hash(None, entry.tokens, digest) == key:
                roots.append((key, entry))
        elif entry.parent is not None and chain_hash(entry.parent, entry.tokens, digest) == key:
            kids[entry.parent].append((key, entry))
    out: list[tuple[bytes, PrefixEntry, int]] = []
    queue = [(key, entry, -1) for key, entry in roots]
    while queue:
        key, entry, parent = queue.pop(0)
        out.append((key, entry, parent))
        queue += [(k, e, len(out) - 1) for k, e in kids.get(key, [])]
    return out


def save_prefix_blocks(
    path: str | os.PathLike, pool: KVPool, model: Any, config: str | CacheConfig | dict
) -> int:
    """Write the prefix-cache entries of ``pool`` made for ``model`` and ``config`` (the config its
    caches were built with) to ``path``, atomically; returns the number of block entries written (0:
    a file of roots only, or none). Raises ValueError for a config with a token policy (never
    shared) or a bad path."""
    probe = _probe(pool, model, config)
    stores = _stores(probe)
    entries = _entries(pool, probe.prefix_digest)
    blocks = [entry for _, entry, _ in entries if entry.sinks is None]
    state = StateDict()
    for i, store in stores.items():
        for kind, pages, column in (("keys", store.packed_k, 0), ("values", store.packed_v, 1)):
            part = state.child(f"layers.{i}.{kind}")
            part.set("spec", spec_state(pages.pool.spec))
            if blocks:
                ids = torch.tensor([e.blocks[i][column] for e in blocks], dtype=torch.int64)
                put_blocks(part.child("blocks"), pages.pool.read(ids), pages.pool.spec)
    for j, (_, entry, _) in enumerate(entries):
        for i, (k, v) in (entry.sinks or {}).items():
            state.put(f"roots.{j}.layers.{i}.keys", k)
            state.put(f"roots.{j}.layers.{i}.values", v)
    metadata = {
        "cache_config": _plain(probe.cache_config),
        "model": model_fingerprint(model),
        "entries": [{"parent": parent, "tokens": list(entry.tokens)} for _, entry, parent in entries],
        "state": state.values,
    }
    write_file(path, KIND, state.tensors, metadata)
    return len(blocks)


def load_prefix_blocks(
    path: str | os.PathLike, pool: KVPool, model: Any, config: str | CacheConfig | dict | None = None
) -> int:
    """Add the entries saved in ``path`` to the prefix cache of ``pool`` (their blocks copied into
    it, then freed: reusable, and findable until reused); returns the number of block entries added
    (those the pool did not hold yet). ``config``: None takes the file's; given, it must be the file's.

    Raises `CacheFileError` (``reason``) for a file that is missing, not a prefix-blocks file, of
    another format version, truncated or damaged, made for another model or config, or whose
    entries do not fit; ValueError for a config with a token policy.
    """
    tensors, meta = read_file(path, KIND)
    name = f"prefix blocks file {str(path)!r}"
    diffs = differences(meta.get("model") or {}, model_fingerprint(model))
    if diffs:
        raise CacheFileError(
            f"{name} was written for another model: {'; '.join(diffs)}; allowed: the model it was written with",
            "model",
        )
    saved = _saved_config(meta, name)
    if config is not None:
        diffs = config_differences(_plain(saved), _plain(SqueezedCache.resolve(config, model.config)))
        if diffs:
            raise CacheFileError(
                f"{name} was written with another cache config: {'; '.join(diffs[:4])}; allowed: the config "
                "it was written with",
                "config",
            )
    probe = _probe(pool, model, saved)
    try:
        return _add(pool, probe, tensors, meta, _device(model))
    except StateError as err:
        raise CacheFileError(f"{name}: {err}", "state") from None


def _add(pool: KVPool, probe: SqueezedCache, tensors: dict, meta: dict, device: torch.device) -> int:
    stores, digest, config = _stores(probe), probe.prefix_digest, probe.cache_config
    entries, state = meta.get("entries"), StateDict(tensors, meta.get("state") or {})
    sinks, bs = config.sink_tokens, config.block_size
    if not isinstance(entries, list):
        raise StateError("its entries are missing")
    keys: list[bytes] = []
    block_of: dict[int, int] = {}  # entry index -> index among the saved blocks
    for j, e in enumerate(entries):
        parent, tokens = (e.get("parent"), e.get("tokens")) if isinstance(e, dict) else (None, None)
        root = parent == -1
        if (
            not isinstance(parent, int)
            or not -1 <= parent < j
            or not isinstance(tokens, list)
            or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens)
            or len(tokens) != (sinks if root else bs)
        ):
            raise StateError(
                f"entry {j} is {e!r:.100}; allowed: a parent before it and {sinks} or {bs} token ids"
            )
        keys.append(chain_hash(None if root else keys[parent], tokens, digest))
        if not root:
            block_of[j] = len(block_of)
    new = [j for j in block_of if pool.prefix.get(keys[j]) is None]
    ids: dict[tuple[int, str], torch.Tensor] = {}
    for i, store in stores.items():
        for kind, pages in (("keys", store.packed_k), ("values", store.packed_v)):
            part = state.child(f"layers.{i}.{kind}")
            if not block_of:
                continue
            spec = spec_from_state(part.value("spec"), part.name("spec"))
            blocks = take_blocks(part.child("blocks"), spec, bs, device)
            if blocks.tensors()[0].shape[0] != len(block_of):
                raise StateError(f"{part.name('blocks')} holds another number of blocks than the entries")
            if new:
                rows = torch.tensor([block_of[j] for j in new], device=device)
                try:
                    ids[i, kind] = pages.pool.add_blocks(
                        blocks.map(lambda t, rows=rows: t.index_select(0, rows))
                    )
                except ValueError as err:
                    raise StateError(f"{part.name('blocks')}: {err}") from None
    pools = {i: (s.packed_k.pool, s.packed_v.pool) for i, s in stores.items()}
    at = {j: n for n, j in enumerate(new)}
    for j, e in enumerate(entries):
        if j in block_of and j not in at:
            continue
        if j in at:
            blocks = {i: (int(ids[i, "keys"][at[j]]), int(ids[i, "values"][at[j]])) for i in stores}
            pool.prefix.put(
                keys[j], PrefixEntry(blocks, parent=keys[e["parent"]], tokens=tuple(e["tokens"])), pools
            )
        elif pool.prefix.get(keys[j]) is None:  # a root
            copies = {}
            for i in stores if sinks else ():
                k = state.need(f"roots.{j}.layers.{i}.keys", device, dims=4)
                v = state.need(f"roots.{j}.layers.{i}.values", device, dims=4)
                copies[i] = (k, v)
            pool.prefix.put(keys[j], PrefixEntry({}, copies, tokens=tuple(e["tokens"])), pools)
    for (i, kind), held in ids.items():  # free them, tails first: evicted before the heads
        (pools[i][0] if kind == "keys" else pools[i][1]).decref(held.flip(0))
    return len(new)
