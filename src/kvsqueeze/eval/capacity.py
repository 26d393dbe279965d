"""Capacity under a memory budget: the longest context whose KV cache fits, predicted and allocated.

Prediction, from each format's own size (``dtype_bytes``: the K/V dtype, the model's dtype):

* exact (`DynamicCache`): ``2 * layers * batch * kv_heads * head_dim * dtype_bytes`` per token;
* `SqueezedCache` (`CacheConfig`): per layer, the sink buffer at its capacity once it holds a
  token, the residual window sized to its tokens, both in the exact parts' storage dtype
  (``CacheConfig.exact_dtype``: 16-bit for a float32 model that quantizes), plus the packed history
  at ``CacheConfig.bytes_per_token`` per packed token (the last page grows with its tokens). How
  many tokens are sinks, packed or in the window is `SinkWindowPolicy.plan` for one update of all
  tokens: appending in whole blocks reaches the same state, whatever the chunking.

Check: build the cache from the model's config, fill it to that length with random K/V through
``cache.update(k, v, layer_idx)``, layer by layer, in chunks (no model is run), compare its bytes
with the prediction and the budget, then append one more token, which must exceed the budget
(it adds a token to the window or packs a block). That appended token's bytes match the
prediction for ``num_tokens + 1``. Models whose layers are not all full
attention are refused (their sliding-window layers' size depends on the fill's chunking).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import torch

from ..config import PRESETS, CacheConfig, exact_storage_dtype
from ..policies.window import SinkWindowPolicy
from ..quant.exact import ExactSpec
from ..storage.block_table import table_capacity
from ..storage.transform import constants_nbytes
from .memory import cache_nbytes
from .methods import Method

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})
FILL_CHUNK_TOKENS = 8192


def parse_size(text: str, field: str = "--memory-budget") -> int:
    """Bytes in a size like ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000`` (bytes); units ignore case."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    units = {u.lower(): v for u, v in UNITS.items()}
    if not match or (match[2] and match[2].lower() not in units):
        raise ValueError(
            f"{field}: {text!r} is not a size; give a number with a unit, allowed units: {list(UNITS)} "
            "(e.g. 2GiB, 512MiB, 1.5GB)"
        )
    size = int(Decimal(match[1]) * units.get(match[2].lower(), 1))
    if size <= 0:
        raise ValueError(f"{field}: {text!r} must be more than 0 bytes")
    return size


@dataclass(frozen=True)
class KVShape:
    """What sizes a model's KV cache: its layers, KV heads, head size and context limit."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int | None

    @classmethod
    def from_config(cls, model_config: Any) -> KVShape:
        cfg = model_config.get_text_config(decoder=True)
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(
                f"--memory-budget: layer_types {sorted(kinds)} are not supported by the capacity report; "
                "allowed: ['full_attention'] only"
            )
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        from ..integrations.context import context_limit

        return cls(cfg.num_hidden_layers, heads, head_dim, context_limit(cfg).tokens)


def exact_bytes(shape: KVShape, num_tokens: int, batch_size: int, spec: ExactSpec | int) -> int:
    """Bytes of an exact cache of ``num_tokens`` tokens stored as ``spec`` (an `ExactSpec`, or its
    bytes per element)."""
    exact = spec if isinstance(spec, ExactSpec) else ExactSpec.for_itemsize(spec)
    per_token = exact.kv_bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim)
    return per_token * batch_size * num_tokens


def squeezed_bytes(
    config: CacheConfig, shape: KVShape, num_tokens: int, batch_size: int, dtype_bytes: int
) -> int:
    """Bytes of a `SqueezedCache` holding ``num_tokens`` tokens (see module docstring): the sink
    buffer at its capacity once used, the window and the packed blocks sized to their tokens (plus
    their block tables, `storage.block_table.table_capacity`), exact
    parts in the storage dtype of ``CacheConfig.exact_dtype`` for a model of ``dtype_bytes``."""
    plan = SinkWindowPolicy(config.sink_tokens, config.residual_window, config.block_size).plan(
        0, 0, num_tokens
    )
    in_window = num_tokens - plan.to_sinks - plan.to_quantize
    exact_tokens = (config.sink_tokens if plan.to_sinks else 0) + in_window
    model = ExactSpec.for_itemsize(dtype_bytes)
    exact = ExactSpec(exact_storage_dtype(config.exact_dtype, model.dtype, not config.is_exact))
    # exact blocks (preset "none") hold the exact parts' storage dtype too
    per_token = config.bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, exact)
    packed = round(plan.to_quantize * batch_size * per_token)
    blocks = plan.to_quantize // config.block_size  # block tables: int32 per row, keys and values
    tables = 2 * shape.num_layers * batch_size * table_capacity(blocks) * 4 if blocks else 0
    constants = constants_nbytes(config._layers(shape.num_layers), shape.head_dim)
    return exact_bytes(shape, exact_tokens, batch_size, exact) + packed + tables + constants


def predictor(
    method: Method, shape: KVShape, dtype_bytes: int, model_config: Any = None
) -> Callable[[int, int], int] | None:
    """``bytes(num_tokens, batch_size)`` of the method's cache, or None when it has no size formula.

    A preset name is sized with its groups fitted to ``shape.head_dim`` (`CacheConfig.for_head_dim`);
    with ``model_config``, a ``best-*`` preset is sized as the bundled calibration it resolves to."""
    if method.config.get("cache") == "DynamicCache":
        return lambda n, b: exact_bytes(shape, n, b, dtype_bytes)
    if "cache" in method.config:
        return None  # transformers' QuantizedCache: its size depends on when the residual was flushed
    config = CacheConfig.from_dict(method.config)
    if config.tokens is not None:
        return None  # token policies: bytes depend on roles and scores, measured by the speed bench
    if model_config is not None:
        from ..calibration.bundled import bundled_config

        config = bundled_config(method.name, model_config) or config
    if method.name in PRESETS:  # as SqueezedCache fits a preset name to the model
        config = config.for_head_dim(shape.head_dim)
    return lambda n, b: squeezed_bytes(config, shape, n, b, dtype_bytes)


def largest_fitting(size: Callable[[int], int], budget_bytes: int, limit: int | None) -> int:
    """Largest token count ``n <= limit`` with ``size(n) <= budget_bytes`` (``size`` non-decreasing)."""
    if limit is None:
        limit = 1
        while size(limit) <= budget_bytes and limit < 2**40:
            limit *= 2
    if size(limit) <= budget_bytes:
        return limit
    low, high = 0, limit  # size(low) fits, size(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) <= budget_bytes else (low, mid)
    return low


def fill(
    cache: Any,
    num_tokens: int,
    batch_size: int,
    shape: KVShape,
    dtype: torch.dtype,
    method: Method,
    chunk_tokens: int = FILL_CHUNK_TOKENS,
) -> None:
    """Append ``num_tokens`` random tokens, (batch, kv_heads, n, head_dim) K/V per chunk, to every layer.

    Chunks are ``chunk_tokens`` rounded up to whole blocks; the first also carries the sinks, so the residual window is empty between
    chunks even with no window (``residual_window`` 0), as `squeezed_bytes` assumes.
    """
    block = method.config.get("block_size", 1)
    chunk = -(-chunk_tokens // block) * block
    sizes, left = [], num_tokens
    while left:
        sizes.append(min(left, chunk + (0 if sizes else method.config.get("sink_tokens", 0))))
        left -= sizes[-1]
    randoms: dict[int, torch.Tensor] = {}
    for n in sizes:
        if n not in randoms:
            randoms[n] = torch.randn(batch_size, shape.num_kv_heads, n, shape.head_dim, dtype=dtype)
        for layer_idx in range(len(cache.layers)):
            cache.update(randoms[n], randoms[n], layer_idx)


@dataclass(frozen=True)
class ConfigOnly:
    """Stands in for a model where only ``model.config`` is read: building a cache."""

    config: Any


def capacity_row(
    method: Method,
    model_config: Any,
    budget_bytes: int,
    batch_size: int,
    dtype: torch.dtype,
    chunk_tokens: int = FILL_CHUNK_TOKENS,
) -> dict:
    """Longest context of ``method`` within ``budget_bytes`` at ``batch_size``, predicted and allocated."""
    for name, value in (
        ("batch_size", batch_size),
        ("budget_bytes", budget_bytes),
        ("chunk_tokens", chunk_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} must be an integer >= 1")
    shape = KVShape.from_config(model_config)
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    row: dict[str, Any] = {"method": method.name, "batch_size": batch_size, "budget_bytes": budget_bytes}
    predict = predictor(method, shape, dtype_bytes, model_config)
    if predict is None:
        why = (
            "its bytes depend on when its residual was flushed"
            if "cache" in method.config
            else "its token policy's bytes depend on the roles and scores of the tokens"
        )
        return {**row, "skipped": f"no size formula ({why})"}
    tokens = largest_fitting(lambda n: predict(n, batch_size), budget_bytes, shape.max_tokens)
    capped = tokens == shape.max_tokens
    cache = method.make_cache(ConfigOnly(model_config))
    with torch.inference_mode():
        fill(cache, tokens, batch_size, shape, dtype, method, chunk_tokens)
        allocated, source = cache_nbytes(cache)
        row.update(max_context=tokens, capped=capped, max_position_embeddings=shape.max_tokens)
        row.update(
            predicted_bytes=predict(tokens, batch_size), allocated_bytes=allocated, kv_bytes_source=source
        )
        row.update(next_predicted_bytes=None, next_allocated_bytes=None)
        if not capped:  # one more token: the next page (block) must not fit
            fill(cache, 1, batch_size, shape, dtype, method)
            row.update(
                next_predicted_bytes=predict(tokens + 1, batch_size),
                next_allocated_bytes=cache_nbytes(cache)[0],
            )
    return row
