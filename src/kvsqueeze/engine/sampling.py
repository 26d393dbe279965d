"""Sampling parameters of one request and the sampler that applies them to a step's logits.

Order of operations (vLLM's and transformers' order): repetition penalty (divide positive logits,
multiply negative ones, for every token already in the prompt or the output), frequency and
presence penalties (over the output tokens), then greedy (``temperature == 0``) or temperature,
top-k, top-p, min-p and a draw from the request's own generator (``seed``: reproducible draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}: {value!r}; allowed: a number in {'(' if low_open else '['}{low}, {high}]")
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"{name}: {value!r}; allowed: {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _integer(name: str, value: object, low: int, high: int | None = None, note: str = "") -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        upper = "" if high is None else f" to {high}"
        raise ValueError(f"{name}: {value!r}; allowed: an integer from {low}{upper}{note}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (OpenAI's and vLLM's names). Raises ValueError naming the
    field for a value out of range.

    max_tokens: tokens to generate at most (≥ 1); temperature: 0 = greedy, else in (0, 2];
    top_p in (0, 1]; top_k: -1 or 0 = off, else ≥ 1; min_p in [0, 1]; seed: the request's own
    random generator (None: the engine's); stop: strings that end the output (not included);
    stop_token_ids: tokens that end it (included in ``token_ids``, not in the text); ignore_eos:
    keep going after the end-of-sequence token; repetition_penalty in (0, 2], presence_penalty and
    frequency_penalty in [-2, 2].
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, 0.0, 2.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _integer("top_k", self.top_k, -1, note=" (-1 or 0: off)")
        _number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**63 - 1)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if (
            not isinstance(stop, (list, tuple))
            or any(not isinstance(s, str) or not s for s in stop)
            or len(stop) > 16
        ):
            raise ValueError(f"stop: {self.stop!r}; allowed: a string or up to 16 non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids: {self.stop_token_ids!r}; allowed: a list of token ids")
        ids = tuple(self.stop_token_ids)
        for t in ids:
            _integer("stop_token_ids", t, 0)
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: {self.ignore_eos!r}; allowed: true or false")
        _number("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """``logits`` (vocab,) float32 with the request's repetition, presence and frequency penalties."""
    if not params.penalized:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in prompt_ids + output_ids if t < vocab}), dtype=torch.long)
        if seen.numel():
            picked = logits[seen]
            logits[seen] = torch.where(
                picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
            )
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` (vocab,) float32 (penalties already applied)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= params.top_p] = 0.0  # keeps the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
