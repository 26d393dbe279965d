"""How many tokens a forward reads from quantized storage, so that a report can say when a lossy
method read none (its scores then equal the exact cache's).

Tokens enter a cache forward by forward; a forward reads what the earlier forwards left in the cache
plus its own new tokens, exact. So the most quantized tokens any of a run's forwards reads is what the
last forward reads: the tokens the earlier forwards left quantized. A `SqueezedCache` quantizes the
tokens leaving its exact sinks and residual window in whole blocks (`policies.window`);
transformers' `QuantizedCache` quantizes its first forward whole and later re-quantizes everything
each time its exact residual would reach ``residual_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import CacheConfig
from ..policies.window import SinkWindowPolicy

QuantizedCounter = Callable[[CacheConfig | None, Sequence[int]], int | None]
"""``count(cache_config, chunk_sizes) -> tokens``: how many tokens the last of forwards of
``chunk_sizes`` tokens into a fresh cache reads from quantized storage (None: a cache that keeps
every token exact by design)."""


def squeezed_quantized_reads(cache_config: CacheConfig | None, chunk_sizes: Sequence[int]) -> int | None:
    """`QuantizedCounter` of a `SqueezedCache` of ``cache_config``: the tokens the forwards before
    the last moved out of the exact sinks and residual window (quantized; with a token policy,
    classified: quantized, kept exact or evicted). None for a config that keeps every token exact."""
    assert cache_config is not None
    if cache_config.is_exact and cache_config.tokens is None:
        return None
    policy = SinkWindowPolicy(cache_config.sink_tokens, cache_config.residual_window, cache_config.block_size)
    num_sinks = num_window = num_left = 0
    for size in chunk_sizes[:-1]:
        plan = policy.plan(num_sinks, num_window, size)
        num_sinks += plan.to_sinks
        num_window += size - plan.to_sinks - plan.to_quantize
        num_left += plan.to_quantize
    return num_left


def first_quantizing_length(cache_config: CacheConfig) -> int:
    """The fewest tokens with which a `SqueezedCache` of ``cache_config`` holds a quantized token:
    the sinks, then a full residual window plus one token, or one block when the window is 0."""
    return cache_config.sink_tokens + max(cache_config.residual_window + 1, cache_config.block_size)


def baseline_quantized_reads(residual_length: int) -> QuantizedCounter:
    """`QuantizedCounter` of transformers' `QuantizedCache` with ``residual_length``."""

    def count(cache_config: CacheConfig | None, chunk_sizes: Sequence[int]) -> int:
        total = residual = 0
        for index, size in enumerate(chunk_sizes[:-1]):
            total += size
            if index > 0:
                residual = 0 if residual + size >= residual_length else residual + size
        return total - residual

    return count


def nothing_quantized_warning(
    name: str, cache_config: CacheConfig | None, chunk_sizes: Sequence[int], what: str
) -> str:
    """Why a lossy method read no quantized token in the forwards of ``chunk_sizes`` tokens of
    each ``what`` (a window, a prompt and its answer, a run)."""
    before = sum(chunk_sizes[:-1])
    if cache_config is None:
        return (
            f"{name}: no forward read a quantized token: each {what} is one forward, read exact; "
            "its scores are the exact cache's"
        )
    return (
        f"{name}: no forward read a quantized token: the {before} tokens before the last forward of each "
        f"{what} stay exact in its {cache_config.sink_tokens} sink tokens and "
        f"{cache_config.residual_window}-token residual window (it quantizes from "
        f"{first_quantizing_length(cache_config)} tokens on), so its scores are the exact cache's"
    )
