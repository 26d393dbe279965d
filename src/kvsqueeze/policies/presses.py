"""Eviction "presses" (kvpress' word) as token policies; each combines with quantization.

Every press decides when tokens leave the residual window, once per token (history is never
revisited), so that eviction and quantization share one invariant: a token's fate is written
once. Differences from the papers, by design:

* StreamingLLM: sinks + recent window, everything else dropped — exactly the paper.
* H2O: heavy hitters by accumulated attention; the attention a token receives is accumulated
  while it sits in the residual window (from the last ``observe_window`` queries of each forward),
  not over its whole life, and an evicted token never comes back.
* SnapKV: the scores of a prefill come from its last ``observe_window`` queries, max-pooled;
  tokens generated later are judged the same way when they leave the window.
* Key norm (kvpress knorm): ``-||k||``, no attention needed (any read path).

``evict`` is the fraction of the tokens leaving the window that is dropped; ``default`` says
what happens to the kept ones: ``exact`` (eviction alone) or ``low``/``high`` (eviction +
quantization); ``keep_exact`` can keep the most important ones exact on top.
"""

from __future__ import annotations

from typing import Any

from .plan import TokenPolicy


def streaming(**kw: Any) -> TokenPolicy:
    """StreamingLLM: keep the sinks and the residual window, drop every token that leaves it."""
    return TokenPolicy(default="evict", **kw)


def h2o(evict: float, default: str = "exact", **kw: Any) -> TokenPolicy:
    """H2O: drop the ``evict`` fraction with the least accumulated attention."""
    return TokenPolicy(default=default, scorer="attention", evict=evict, **kw)


def snapkv(
    evict: float, default: str = "exact", observe_window: int = 32, pool_size: int = 7, **kw: Any
) -> TokenPolicy:
    """SnapKV: attention from an observation window of the last queries, max-pooled over neighbours."""
    return TokenPolicy(
        default=default,
        scorer="attention",
        evict=evict,
        observe_window=observe_window,
        pool_size=pool_size,
        **kw,
    )


def knorm(evict: float, default: str = "exact", **kw: Any) -> TokenPolicy:
    """Key norm: drop the ``evict`` fraction of tokens with the largest key norms."""
    return TokenPolicy(default=default, scorer="knorm", evict=evict, **kw)
