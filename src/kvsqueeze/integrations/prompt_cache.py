"""Prompt caches: one sequence's `SqueezedCache` saved to a safetensors file and loaded back.

llama.cpp's ``--prompt-cache`` habit over quantized blocks: prefill a long prompt once, save the
cache, and later load it instead of recomputing the prefill. The file holds everything the cache
holds (every layer's packed blocks with their scales and zero points, exact sinks, residual window,
pending tokens, a token policy's classes, scores and roles, exact sliding-window layers), the token
ids, optionally the logits of the last token, and in its header the cache config, the model's
fingerprint (`fingerprint.model_fingerprint`) and the format version (`storage.persist`).

A loaded cache is the saved one: the first token sampled from the saved logits, and every later
forward, give the same bits as continuing the cache that was saved, with the same read path (the
model's attention implementation). A file made for another model, config or format version, or
truncated or damaged, is refused with a `CacheFileError` naming what differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CacheConfig
from ..storage.persist import CacheFileError, read_file, write_file
from ..storage.prefix_cache import KVPool
from ..storage.state import StateDict, StateError
from .cache import SqueezedCache, SqueezedLayer
from .fingerprint import config_differences, differences, model_fingerprint
from .prefix import publish

KIND = "kvsqueeze.prompt_cache"


@dataclass
class PromptCache:
    """A loaded prompt cache: ``cache`` holds the tokens ``token_ids``; ``logits`` (vocab,) are the
    model's logits after the last of them, when they were saved (None otherwise)."""

    cache: SqueezedCache
    token_ids: list[int]
    logits: torch.Tensor | None


def _token_list(token_ids: Any, label: str = "token_ids") -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if (
            token_ids.is_floating_point()
            or token_ids.dim() > 2
            or (token_ids.dim() == 2 and token_ids.shape[0] != 1)
        ):
            raise ValueError(
                f"{label}: tensor {tuple(token_ids.shape)} {token_ids.dtype}; allowed: (tokens,) or (1, tokens) ids"
            )
        token_ids = token_ids.flatten().tolist()
    if not isinstance(token_ids, (list, tuple)) or any(
        isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in token_ids
    ):
        raise ValueError(f"{label}: {token_ids!r:.80}; allowed: a list of token ids (integers >= 0)")
    return list(token_ids)


def _layer_kind(layer: Any) -> str:
    return "squeezed" if isinstance(layer, SqueezedLayer) else "exact"


def save_prompt_cache(
    path: str | os.PathLike,
    cache: SqueezedCache,
    model: Any,
    token_ids: Any = None,
    logits: torch.Tensor | None = None,
) -> int:
    """Write ``cache`` (one sequence) for ``model`` to ``path``, atomically; returns the file's bytes.

    Args:
        token_ids: the ids of the tokens the cache holds, (tokens,) or (1, tokens), as many as it has
            seen; None: the ids a cache on a `KVPool` follows.
        logits: the model's logits after the last token ((vocab,) or (1, 1, vocab)), so that the first
            new token needs no forward after loading; stored as given (dtype kept).

    Raises ValueError for: a cache that is not a `SqueezedCache`, is empty, holds a batch of more than
    one sequence or a left-padded row; token ids missing or not as many as the tokens seen; logits of
    another vocabulary size; a path that is a directory or in a missing directory.
    """
    if not isinstance(cache, SqueezedCache):
        raise ValueError(f"cache: {type(cache).__name__}; allowed: a kvsqueeze SqueezedCache")
    seen = cache.get_seq_length()
    if not seen:
        raise ValueError("cache: it holds no tokens; allowed: a cache after its prefill")
    if token_ids is None:
        if cache.token_ids is None:
            raise ValueError(
                "token_ids: missing; allowed: the ids of the tokens the cache holds (only a cache on a KVPool "
                "follows them by itself)"
            )
        token_ids = cache.token_ids
    ids = _token_list(token_ids)
    if len(ids) != seen:
        raise ValueError(
            f"token_ids: {len(ids)} ids for a cache that has seen {seen} tokens; allowed: {seen} ids"
        )
    vocab = model.config.get_text_config(decoder=True).vocab_size
    if logits is not None:
        if not isinstance(logits, torch.Tensor) or logits.numel() != vocab:
            what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"logits: {what}; allowed: the {vocab} logits of the last token, e.g. (1, 1, {vocab})"
            )
        logits = logits.detach().reshape(vocab)
    state = StateDict()
    layers = []
    for i, layer in enumerate(cache.layers):
        part = state.child(f"layers.{i}")
        if isinstance(layer, SqueezedLayer):
            store = layer.store
            if store.batch_size > 1:
                raise ValueError(
                    f"cache: a batch of {store.batch_size} sequences; allowed: one sequence per prompt cache file"
                )
            if store.row_sinks.active:
                raise ValueError(
                    "cache: a left-padded row; allowed: one unpadded sequence per prompt cache file"
                )
            store.save_state(part)
        elif getattr(layer, "is_initialized", False):  # transformers' exact (sliding-window) layer
            part.put("keys", layer.keys)
            part.put("values", layer.values)
            part.set("num_seen", layer.get_seq_length())
        layers.append({"kind": _layer_kind(layer), "dtype": _dtype_name(getattr(layer, "dtype", None))})
    if logits is not None:
        state.put("logits", logits)
    metadata = {
        "cache_config": _plain(cache.cache_config),
        "model": model_fingerprint(model),
        "token_ids": ids,
        "layers": layers,
        "state": state.values,
    }
    return write_file(path, KIND, state.tensors, metadata)


def load_prompt_cache(
    path: str | os.PathLike,
    model: Any,
    config: str | CacheConfig | dict | None = None,
    pool: KVPool | None = None,
    fused: bool | None = None,
) -> PromptCache:
    """The prompt cache saved in ``path`` as a new `SqueezedCache` for ``model`` (on ``pool`` when
    given: its full blocks are then published to the pool's prefix cache, as after a prefill).

    ``config``: None takes the file's; given (a preset name, `CacheConfig` or dict), it must resolve
    to the file's config. ``fused``: the read path, as in `SqueezedCache.from_model`.

    Raises `CacheFileError` (a ValueError; ``reason`` says which) for a missing or unreadable file, one
    that is not a safetensors file or not a prompt cache, a format version this version does not read,
    a truncated or damaged file (checksum), a file made for another model (naming the fingerprint
    fields that differ) or another config (naming the config fields that differ), or contents that
    do not fit the cache.
    """
    tensors, meta = read_file(path, KIND)
    name = f"prompt cache file {str(path)!r}"
    saved_model, current = meta.get("model"), model_fingerprint(model)
    if not isinstance(saved_model, dict):
        raise CacheFileError(f"{name} has no model fingerprint", "corrupted")
    diffs = differences(saved_model, current)
    if diffs:
        raise CacheFileError(
            f"{name} was written for another model: {'; '.join(diffs)}; allowed: the model it was written "
            "with (delete the file to recompute it)",
            "model",
        )
    saved = _saved_config(meta, name)
    if config is not None:
        wanted = SqueezedCache.resolve(config, model.config)
        diffs = config_differences(_plain(saved), _plain(wanted))
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; ... {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise CacheFileError(
                f"{name} was written with another cache config: {shown}; allowed: the config it was written "
                "with (or delete the file to recompute it)",
                "config",
            )
    cache = SqueezedCache.from_model(model, saved, fused=fused, pool=pool, risk_check=False)
    try:
        ids = _fill(cache, tensors, meta, model)
    except (StateError, ValueError) as err:
        cache.reset()
        raise CacheFileError(f"{name}: {err}", "state") from None
    if cache.token_ids is not None:  # on a KVPool: follow the ids and publish the full blocks
        cache.token_ids = list(ids)
        publish(cache)
    logits = tensors.get("logits")
    device = _device(model)
    return PromptCache(cache, ids, None if logits is None else logits.to(device))


def _fill(cache: SqueezedCache, tensors: dict, meta: dict, model: Any) -> list[int]:
    """Load every layer's saved state into the empty ``cache``; the token ids (checked against it)."""
    layers, values = meta.get("layers"), meta.get("state")
    if not isinstance(layers, list) or len(layers) != len(cache.layers) or not isinstance(values, dict):
        raise StateError(f"the file describes {len(layers or [])} layers; this model has {len(cache.layers)}")
    state, device = StateDict(tensors, values), _device(model)
    for i, (layer, info) in enumerate(zip(cache.layers, layers, strict=True)):
        if not isinstance(info, dict) or info.get("kind") != _layer_kind(layer):
            raise StateError(
                f"layer {i} was saved as {info!r}; this cache's layer {i} is {_layer_kind(layer)}"
            )
        part = state.child(f"layers.{i}")
        dtype = getattr(torch, str(info.get("dtype")), None)
        if isinstance(layer, SqueezedLayer):
            if not isinstance(dtype, torch.dtype):
                raise StateError(f"layer {i}: dtype {info.get('dtype')!r}; allowed: a torch dtype name")
            probe = torch.empty(0, dtype=dtype, device=device)
            layer.lazy_initialization(probe, probe)
            layer.store.load_state(part, device)
        elif part.has("keys"):
            keys, values_ = part.need("keys", device, dims=4), part.need("values", device, dims=4)
            layer.lazy_initialization(keys, values_)
            layer.keys, layer.values = keys, values_
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = part.count("num_seen")
    ids = _token_list(meta.get("token_ids"), "token_ids (file)")
    if len(ids) != cache.get_seq_length():
        raise StateError(f"{len(ids)} token ids for {cache.get_seq_length()} tokens held")
    return ids


def _saved_config(meta: dict, name: str) -> CacheConfig:
    try:
        return CacheConfig.from_dict(meta.get("cache_config"))
    except (ValueError, TypeError) as err:
        raise CacheFileError(f"{name}: its cache config is not readable ({err})", "corrupted") from None


def _plain(config: CacheConfig) -> Any:
    """``config`` as the JSON tree a file stores (tuples as lists), for comparisons."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _device(model: Any) -> torch.device:
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return torch.device("cpu") if param is None else param.device
