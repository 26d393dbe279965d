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
from .quantized_reads import nothing_quantized_warning
from .report import kv_shape, record_config

STREAMING_TOLERANCE = 0.005
"""Largest allowed |streamed exact PPL / full-sequence PPL - 1| (0.5 %)."""


@dataclass(frozen=True)
class QualityRow:
    """One method's scores; the comparison fields are None for the exact (reference) row.

    Attributes:
        method: method name (``exact`` first).
        cache, config, read_path, options: what ran (`report.method_record`): the cache class, the
            `CacheConfig` dict the cache held (None for transformers' caches), its read path, and
            the options of a transformers cache.
        bits_per_element, bytes_per_token: the sizes `kvsqueeze presets` shows for that config on
            this model (`report.config_sizes`; transformers' caches: their nominal bits).
        quantized_tokens: tokens the last forward of each window read quantized, the most any scored
            prediction read (`quantized_reads`; with a token policy: tokens that left the exact sinks
            and window); None for caches that keep every token exact (``exact``, ``none``). 0 for a
            lossy method means its scores are the exact cache's: see ``warning``.
        exact_tokens: tokens that last forward read exact (sinks, residual window, its own tokens).
        warning: why the row says less than it seems (no quantized token was read), else None.
        ppl, ppl_stderr, num_scored: streamed perplexity, its standard error, scored tokens.
        delta_ppl_pct: ``100 * (ppl / exact_ppl - 1)``.
        kld_mean, kld_p99: mean and 99th percentile of the per-token KL(exact || method), nats.
        top1_agreement: fraction of scored positions where both argmax tokens agree.
        full_sequence_ppl, streaming_rel_diff: exact row only, the cache-free perplexity of the same
            windows and ``ppl / full_sequence_ppl - 1``.
        seconds: wall time of this row (the exact reference is re-streamed inside each method's row).
    """

    method: str
    cache: str
    config: dict | None
    read_path: str | None
    options: dict
    bits_per_element: float
    bytes_per_token: float
    quantized_tokens: int | None
    exact_tokens: int
    warning: str | None
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_elements_per_token(model_config: Any) -> int:
    """K and V elements stored per token over all layers: ``2 * num_layers * num_kv_heads * head_dim``."""
    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    return 2 * num_layers * num_kv_heads * head_dim


def _row_record(method: Method, model: Any, spec: StreamSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ran (`Method.record`) and how many tokens of each window it quantized."""
    record = method.record(model)
    config = record_config(record)
    chunk_sizes = [end - start for start, end in spec.chunk_bounds()]
    quantized = method.quantized_tokens(config, chunk_sizes)
    warning = None
    if quantized == 0:
        warning = nothing_quantized_warning(method.name, config, chunk_sizes, "window")
    counts = {
        "quantized_tokens": quantized,
        "exact_tokens": spec.window_tokens - (quantized or 0),
        "warning": warning,
    }
    fields = {
        k: record[k]
        for k in ("cache", "config", "read_path", "options", "bits_per_element", "bytes_per_token")
    }
    return fields, counts


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
        One `QualityRow` dict per method, exact first; each holds what ran (`Method.record`).
    """
    spec.windows(token_ids)  # fail on a too-short text before any forward
    exact = resolve_method("exact")
    others = [m for m in methods if m.name != exact.name]
    records = [_row_record(m, model, spec) for m in [exact, *others]]  # every cache builds before any forward

    start = time.perf_counter()
    streamed = streamed_perplexity(
        model, token_ids, exact.make_cache, spec, progress=progress, desc="exact (streamed)"
    )
    full = full_sequence_perplexity(model, token_ids, spec, progress=progress, desc="exact (full sequence)")
    fields, counts = records[0]
    rows = [
        QualityRow(
            method=exact.name,
            **fields,
            **counts,
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
        )
    ]
    for method, (fields, counts) in zip(others, records[1:], strict=True):
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
                **fields,
                **counts,
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
            )
        )
    return [row.to_dict() for row in rows]
