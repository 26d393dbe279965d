"""Greedy decoding through a cache, with timing and (optionally) teacher forcing.

Teacher forcing feeds a reference token sequence (e.g. the exact cache's greedy output) so that
the per-step argmax of a quantized cache can be compared position by position, instead of
comparing two free-running sequences that stop being comparable after the first divergence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .progress import bar_disabled


@dataclass(frozen=True)
class DecodeResult:
    """Greedy argmax per step (num_new,), the tokens fed, and timings in seconds."""

    argmax: torch.Tensor
    tokens: torch.Tensor
    prefill_seconds: float
    decode_seconds: float

    @property
    def seconds_per_token(self) -> float:
        steps = max(len(self.tokens) - 1, 1)
        return self.decode_seconds / steps

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.decode_seconds > 0 else float("nan")


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: object,
    max_new_tokens: int,
    forced: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "decode",
) -> DecodeResult:
    """Prefill ``input_ids`` (1, prompt_tokens), then ``max_new_tokens`` greedy steps.

    With ``forced`` (max_new_tokens,), step i feeds ``forced[i]`` instead of the argmax, so that
    ``argmax`` can be compared with another run position by position. ValueError naming the
    argument when ``input_ids`` is not one non-empty row, ``max_new_tokens`` < 1, or ``forced`` is
    not ``max_new_tokens`` ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids: shape {tuple(input_ids.shape)}; allowed: (1, prompt_tokens >= 1)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r} must be an integer >= 1")
    if forced is not None and tuple(forced.shape) != (max_new_tokens,):
        raise ValueError(
            f"forced: shape {tuple(forced.shape)}; allowed: ({max_new_tokens},), one id per step"
        )
    start = time.perf_counter()
    out = model(input_ids, cache=cache, use_cache=True)
    prefill = time.perf_counter() - start
    argmax, fed = [], []
    start = time.perf_counter()
    for i in tqdm(range(max_new_tokens), desc=desc, disable=bar_disabled(progress), leave=False):
        step_argmax = out.logits[0, -1].argmax()
        argmax.append(step_argmax)
        token = step_argmax if forced is None else forced[i]
        fed.append(token)
        if i + 1 < max_new_tokens:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
    decode = time.perf_counter() - start
    return DecodeResult(torch.stack(argmax), torch.stack(fed), prefill, decode)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, int]:
    """Fraction of equal positions, and the first position where they differ (len if none)."""
    equal = reference == other
    first = int((~equal).nonzero()[0, 0]) if not bool(equal.all()) else len(reference)
    return float(equal.float().mean()), first
