"""Perplexity, KL divergence and top-1 agreement of a causal LM whose KV cache is filled chunk by chunk.

The text is cut into consecutive, non-overlapping windows of ``StreamSpec.window_tokens`` tokens. Each
window gets a fresh cache from ``make_cache(model)``; its first ``prefill_tokens`` tokens go through one
forward, the rest through forwards of ``chunk_tokens`` tokens that see only the cache and the chunk, so
every prediction after the prefill is made from what the cache kept. Token ``t + 1`` is scored with the
logits at position ``t`` (the first token of a chunk is predicted by the last logit of the previous one).

Comparing against a reference cache (``streamed_perplexity(..., reference=make_exact_cache)``) runs the
reference and the tested cache side by side, chunk by chunk, over the same tokens: per-token
KL(reference || tested) and top-1 agreement are computed from the two logit chunks, which are then
dropped, so no ``(num_tokens, vocab_size)`` tensor is ever kept.

The model is any transformers causal LM (``model(input_ids=..., cache=..., use_cache=...,
attention_mask=None, logits_to_keep=...)`` returning ``.logits`` and ``.cache``); this module
imports nothing from transformers at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .progress import bar_disabled

if TYPE_CHECKING:
    from transformers import Cache

CacheFactory = Callable[[Any], "Cache | None"]
"""Builds a fresh cache for one window: ``make_cache(model) -> Cache | None`` (None: the model's default)."""

LOG_SOFTMAX_ROWS = 256
"""Positions whose float32 log-softmax is materialised at once (bounds memory for large vocabularies)."""


@dataclass(frozen=True)
class StreamSpec:
    """How the text is windowed and streamed through the cache.

    Attributes:
        window_tokens: tokens per window (each window starts with an empty cache).
        num_windows: number of consecutive windows taken from the start of the text.
        prefill_tokens: tokens of the first forward of each window (at most ``window_tokens``).
        chunk_tokens: tokens per forward after the prefill (1 = pure decoding).
        score_second_half: score only the tokens in the second half of each window (llama.cpp style),
            i.e. positions ``window_tokens // 2`` to ``window_tokens - 1``.
    """

    window_tokens: int = 2048
    num_windows: int = 2
    prefill_tokens: int = 256
    chunk_tokens: int = 64
    score_second_half: bool = False

    def __post_init__(self) -> None:
        _check_int("window_tokens", self.window_tokens, minimum=2)
        _check_int("num_windows", self.num_windows, minimum=1)
        _check_int("prefill_tokens", self.prefill_tokens, minimum=1)
        _check_int("chunk_tokens", self.chunk_tokens, minimum=1)
        if self.prefill_tokens > self.window_tokens:
            raise ValueError(
                f"prefill_tokens={self.prefill_tokens} is not allowed; "
                f"it must be an integer in [1, window_tokens={self.window_tokens}]"
            )
        if not isinstance(self.score_second_half, bool):
            raise ValueError(
                f"score_second_half={self.score_second_half!r} is not allowed; use True or False"
            )

    @property
    def first_scored_position(self) -> int:
        """Position (within a window) of the first scored token."""
        return self.window_tokens // 2 if self.score_second_half else 1

    @property
    def num_scored_per_window(self) -> int:
        """Number of scored tokens in each window."""
        return self.window_tokens - self.first_scored_position

    @property
    def num_scored(self) -> int:
        """Number of scored tokens over all windows."""
        return self.num_windows * self.num_scored_per_window

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of the prefill then of every chunk, covering ``[0, window_tokens)``."""
        bounds = [(0, self.prefill_tokens)]
        for start in range(self.prefill_tokens, self.window_tokens, self.chunk_tokens):
            bounds.append((start, min(start + self.chunk_tokens, self.window_tokens)))
        return bounds

    def windows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Cut ``token_ids`` (shape ``(num_tokens,)``) into ``(num_windows, window_tokens)``."""
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}; expected (num_tokens,)")
        needed = self.num_windows * self.window_tokens
        if token_ids.numel() < needed:
            raise ValueError(
                f"num_windows={self.num_windows} x window_tokens={self.window_tokens} needs {needed} tokens, "
                f"but the text has only {token_ids.numel()}; lower num_windows or window_tokens"
            )
        return token_ids[:needed].reshape(self.num_windows, self.window_tokens)


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}={value!r} is not allowed; it must be an integer >= {minimum}")


@dataclass
class PerplexityResult:
    """Scores over ``num_scored`` tokens; the comparison fields are set only when a reference was run.

    ``ppl = exp(mean_nll)``; ``nll_stderr`` is the standard error of the mean NLL and ``ppl_stderr`` its
    delta-method image ``ppl * nll_stderr``. ``kld_mean`` / ``kld_p99`` are the mean and 99th percentile of
    the per-token KL(reference || tested) in nats, ``top1_agreement`` the fraction of scored positions
    where both argmax tokens agree, ``reference_ppl`` the perplexity of the reference cache,
    ``delta_pct`` the change of perplexity vs the reference in percent and ``delta_pct_stderr`` its
    paired standard error (from the per-token NLL differences, which cancels the text's own noise).
    """

    ppl: float
    ppl_stderr: float
    mean_nll: float
    nll_stderr: float
    num_scored: int
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agreement: float | None = None
    reference_ppl: float | None = None
    delta_pct: float | None = None
    delta_pct_stderr: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def log_softmax_f32(logits: torch.Tensor) -> torch.Tensor:
    """``(num_positions, vocab_size)`` logits of any float dtype -> float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def target_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` (shape ``(num_positions,)``) under ``log_probs`` (``(num_positions, vocab_size)``).

    Returns float64 of shape ``(num_positions,)``.
    """
    return -log_probs.gather(-1, targets[:, None]).squeeze(-1).double()


def kl_divergence(ref_log_probs: torch.Tensor, test_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || test) in nats from two ``(num_positions, vocab_size)`` log-probabilities.

    Terms are computed in the inputs' dtype (float32) and summed in float64. Returns float64 of shape
    ``(num_positions,)``.
    """
    return (ref_log_probs.exp() * (ref_log_probs - test_log_probs)).sum(-1, dtype=torch.float64)


def summarize(
    nll: torch.Tensor,
    kld: torch.Tensor | None = None,
    top1_agree: torch.Tensor | None = None,
    reference_nll: torch.Tensor | None = None,
) -> PerplexityResult:
    """Aggregate per-token float64 NLLs (and optionally KLDs, bool agreements, reference NLLs), all ``(n,)``."""
    num_scored = nll.numel()
    mean_nll = nll.mean().item()
    nll_stderr = (nll.std().item() / math.sqrt(num_scored)) if num_scored > 1 else float("nan")
    ppl = math.exp(mean_nll)
    delta = delta_err = None
    if reference_nll is not None:
        diff = nll - reference_nll
        delta = 100 * math.expm1(diff.mean().item())
        spread = diff.std().item() / math.sqrt(num_scored) if num_scored > 1 else float("nan")
        delta_err = 100 * math.exp(diff.mean().item()) * spread
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=ppl * nll_stderr,
        mean_nll=mean_nll,
        nll_stderr=nll_stderr,
        num_scored=num_scored,
        kld_mean=None if kld is None else kld.mean().item(),
        kld_p99=None if kld is None else float(np.percentile(kld.cpu().numpy(), 99)),
        top1_agreement=None if top1_agree is None else top1_agree.double().mean().item(),
        reference_ppl=None if reference_nll is None else math.exp(reference_nll.mean().item()),
        delta_pct=delta,
        delta_pct_stderr=delta_err,
    )


def _window_logits(
    model: Any,
    window: torch.Tensor,
    make_cache: CacheFactory,
    bounds: Sequence[tuple[int, int]],
    first_scored: int,
    use_cache: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run one window (``(window_tokens,)``) forward by forward, one cache for the whole window.

    Yields per forward ``(targets, logits)``: the scored tokens this forward predicts, ``(num_rows,)``, and
    their logits ``(num_rows, vocab_size)`` (``num_rows`` may be 0).
    """
    window_tokens = window.numel()
    cache = make_cache(model) if use_cache else None
    for start, end in bounds:
        first_row = max(start, first_scored - 1)  # first position whose prediction is scored
        num_rows = max(0, min(end, window_tokens - 1) - first_row)
        output = model(
            input_ids=window[None, start:end],
            cache=cache,
            use_cache=use_cache,
            attention_mask=None,
            logits_to_keep=max(end - first_row, 1),  # the last position of the window has no target
        )
        cache = output.cache if use_cache else None
        yield window[first_row + 1 : first_row + 1 + num_rows], output.logits[0, :num_rows]


def _scored_blocks(
    model: Any,
    windows: torch.Tensor,
    factories: Sequence[CacheFactory],
    spec: StreamSpec,
    bounds: Sequence[tuple[int, int]],
    use_cache: bool,
    progress: bool,
    desc: str = "perplexity",
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Stream every window through each factory's cache side by side.

    Yields ``(targets, log_probs)`` blocks of at most :data:`LOG_SOFTMAX_ROWS` positions: ``targets``
    ``(num_rows,)`` and one float32 ``(num_rows, vocab_size)`` log-probability tensor per factory.
    """
    device = model.device
    total = windows.shape[0] * len(bounds)
    with tqdm(total=total, desc=desc, unit="chunk", disable=bar_disabled(progress)) as bar:
        for window in windows.to(device):
            streams = [
                _window_logits(model, window, make, bounds, spec.first_scored_position, use_cache)
                for make in factories
            ]
            for outputs in zip(*streams, strict=True):
                targets = outputs[0][0]
                for row in range(0, targets.numel(), LOG_SOFTMAX_ROWS):
                    rows = slice(row, row + LOG_SOFTMAX_ROWS)
                    yield targets[rows], [log_softmax_f32(logits[rows]) for _, logits in outputs]
                bar.update(1)


def streamed_logprobs(
    model: Any,
    token_ids: torch.Tensor,
    make_cache: CacheFactory,
    spec: StreamSpec,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every scored token and the model's top-1 prediction at that position.

    Args:
        token_ids: ``(num_tokens,)`` long tensor; at least ``num_windows * window_tokens`` tokens.

    Returns:
        ``(token_logprobs, top1_ids)``: float64 and int64, both ``(num_windows, num_scored_per_window)``,
        on the CPU.
    """
    windows = spec.windows(token_ids)
    logprobs, top1 = [], []
    with torch.inference_mode():
        for targets, (log_probs,) in _scored_blocks(
            model, windows, [make_cache], spec, spec.chunk_bounds(), True, progress
        ):
            logprobs.append(-target_nll(log_probs, targets).cpu())
            top1.append(log_probs.argmax(-1).cpu())
    shape = (spec.num_windows, spec.num_scored_per_window)
    return torch.cat(logprobs).reshape(shape), torch.cat(top1).reshape(shape)


def streamed_perplexity(
    model: Any,
    token_ids: torch.Tensor,
    make_cache: CacheFactory,
    spec: StreamSpec,
    reference: CacheFactory | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` when its KV cache comes from ``make_cache``, streamed as ``spec`` says.

    Args:
        token_ids: ``(num_tokens,)`` long tensor; at least ``num_windows * window_tokens`` tokens.
        make_cache: builds the tested cache for each window.
        reference: optional factory of the reference cache (typically the exact ``DynamicCache``). When
            given, it is streamed side by side with the tested cache over the same chunks, and the result
            also carries ``kld_mean``, ``kld_p99``, ``top1_agreement`` and ``reference_ppl``; this doubles
            the forwards but keeps memory at one chunk of logits per cache.
        desc: label of the progress bar.
    """
    windows = spec.windows(token_ids)
    factories = [make_cache] if reference is None else [make_cache, reference]
    nll, kld, agree, ref_nll = [], [], [], []
    with torch.inference_mode():
        for targets, log_probs in _scored_blocks(
            model, windows, factories, spec, spec.chunk_bounds(), True, progress, desc
        ):
            nll.append(target_nll(log_probs[0], targets).cpu())
            if reference is not None:
                test, ref = log_probs
                kld.append(kl_divergence(ref, test).cpu())
                agree.append((ref.argmax(-1) == test.argmax(-1)).cpu())
                ref_nll.append(target_nll(ref, targets).cpu())
    if reference is None:
        return summarize(torch.cat(nll))
    return summarize(torch.cat(nll), torch.cat(kld), torch.cat(agree), torch.cat(ref_nll))


def full_sequence_perplexity(
    model: Any, token_ids: torch.Tensor, spec: StreamSpec, progress: bool = True, desc: str = "perplexity"
) -> PerplexityResult:
    """Reference path: one cache-free forward per window, scoring the same tokens as the streamed path.

    Args:
        token_ids: ``(num_tokens,)`` long tensor; at least ``num_windows * window_tokens`` tokens.
    """
    windows = spec.windows(token_ids)
    whole_window = [(0, spec.window_tokens)]
    nll = []
    with torch.inference_mode():
        for targets, (log_probs,) in _scored_blocks(
            model, windows, [lambda _model: None], spec, whole_window, False, progress, desc
        ):
            nll.append(target_nll(log_probs, targets).cpu())
    return summarize(torch.cat(nll))
