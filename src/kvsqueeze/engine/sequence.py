"""`Sequence`: one request inside the engine — its tokens, its cache, its state and its text so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its cache dropped; recomputed on admission)
    RUNNING = "running"  # holds a cache; in prefill until every known token is computed, then decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. ``prompt_ids`` and ``output_ids`` are token ids; the cache holds
    ``num_computed`` of ``prompt_ids + output_ids`` (the last generated token is computed at the
    next step). ``cached_tokens``: prompt tokens taken from the prefix cache at admission."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    cache: Any = None  # a SqueezedCache while running
    num_computed: int = 0
    cached_tokens: int = 0
    text: str = ""  # output text emitted so far (stop strings cut)
    finish_reason: str | None = None
    error: str | None = None
    failures: int = 0  # forwards that raised while this sequence was in the batch
    num_preemptions: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens to run through the model before the next sample (prompt chunks, or 1 when decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
