"""Quality of each cache method against the exact cache, on streamed text.

For every method, the text windows go through the model chunk by chunk (see :mod:`.perplexity`) with the
method's cache, side by side with the exact ``DynamicCache``: perplexity with its standard error and the
number of scored tokens, ΔPPL % against the exact cache, and the per-token KL(exact || method) (mean and
99th percentile) and top-1 agreement of the next-token distributions.

The exact cache is also scored by one cache-free forward per window (the plain full-sequence
perplexity); its relative difference to the streamed exact perplexity shows that streaming itself is
lossless (it must stay within :data:`STREAMING_TOLERANCE`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .methods import Method, resolve_method
from .perplexity import StreamSpec, full_sequence_perplexity, streamed_perplexity

STREAMING_TOLERANCE = 0.005
"""Largest allowed |streamed exact PPL / full-sequence PPL - 1| (0.5 %)."""


@dataclass(frozen=True)
class QualityRow:
    """One method's scores; the comparison fields are None for the exact (reference) row.

    Attributes:
        method: method name (``exact`` first).
        bits_per_element: nominal stored bits per K/V element (see `Method`).
        bytes_per_token: ``bits_per_element`` over all layers, keys and values, in bytes.
        ppl, ppl_stderr, num_scored: streamed perplexity, its standard error, scored tokens.
        delta_ppl_pct: ``100 * (ppl / exact_ppl - 1)``.
        kld_mean, kld_p99: mean and 99th percentile of the per-token KL(exact || method), nats.
        top1_agreement: fraction of scored positions where both argmax tokens agree.
        full_sequence_ppl, streaming_rel_diff: exact row only, the cache-free perplexity of the same
            windows and ``ppl / full_sequence_ppl - 1``.
        seconds: wall time of this row (the exact reference is re-streamed inside each method's row).
        config: the method's configuration.
    """

    method: str
    bits_per_element: float
    bytes_per_token: float
    ppl: float
    ppl_stderr: float
    num_scored: int
    delta_ppl_pct: float
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None
    full_sequence_ppl: float | None
    streaming_rel_diff: float | None
    seconds: float
    config: dict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_elements_per_token(model_config: Any) -> int:
    """K and V elements stored per token over all layers: ``2 * num_layers * num_kv_heads * head_dim``."""
    cfg = model_config.get_text_config(decoder=True)
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * num_kv_heads * head_dim


def evaluate_quality(
    model: Any,
    token_ids: torch.Tensor,
    methods: list[Method],
    spec: StreamSpec,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every method against the exact cache on the windows ``spec`` cuts from ``token_ids``.

    Args:
        model: a transformers causal LM.
        token_ids: ``(num_tokens,)`` long tensor, at least ``spec.num_windows * spec.window_tokens``.
        methods: methods to score; an ``exact`` row is always computed first (added if absent).
        spec: windowing and streaming of the text.

    Returns:
        One `QualityRow` dict per method, exact first.
    """
    spec.windows(token_ids)  # fail on a too-short text before any forward
    exact = resolve_method("exact")
    elements = kv_elements_per_token(model.config)

    start = time.perf_counter()
    streamed = streamed_perplexity(
        model, token_ids, exact.make_cache, spec, progress=progress, desc="exact (streamed)"
    )
    full = full_sequence_perplexity(model, token_ids, spec, progress=progress, desc="exact (full sequence)")
    rows = [
        QualityRow(
            method=exact.name,
            bits_per_element=exact.bits_per_element,
            bytes_per_token=exact.bits_per_element * elements / 8,
            ppl=streamed.ppl,
            ppl_stderr=streamed.ppl_stderr,
            num_scored=streamed.num_scored,
            delta_ppl_pct=0.0,
            kld_mean=None,
            kld_p99=None,
            top1_agreement=None,
            full_sequence_ppl=full.ppl,
            streaming_rel_diff=streamed.ppl / full.ppl - 1,
            seconds=time.perf_counter() - start,
            config=exact.config,
        )
    ]
    for method in methods:
        if method.name == exact.name:
            continue
        start = time.perf_counter()
        result = streamed_perplexity(
            model,
            token_ids,
            method.make_cache,
            spec,
            reference=exact.make_cache,
            progress=progress,
            desc=f"{method.name} vs exact",
        )
        rows.append(
            QualityRow(
                method=method.name,
                bits_per_element=method.bits_per_element,
                bytes_per_token=method.bits_per_element * elements / 8,
                ppl=result.ppl,
                ppl_stderr=result.ppl_stderr,
                num_scored=result.num_scored,
                delta_ppl_pct=100 * (result.ppl / streamed.ppl - 1),
                kld_mean=result.kld_mean,
                kld_p99=result.kld_p99,
                top1_agreement=result.top1_agreement,
                full_sequence_ppl=None,
                streaming_rel_diff=None,
                seconds=time.perf_counter() - start,
                config=method.config,
            )
        )
    return [row.to_dict() for row in rows]
