"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Every step (Orca's iteration-level scheduling, vLLM's chunked prefill):

1. running sequences, oldest first, each get their uncomputed tokens — 1 when decoding, a chunk of
   the prompt while prefilling — within ``max_num_batched_tokens`` tokens per step. A prompt chunk
   ends at the next multiple of ``chunked_prefill_size`` tokens of its sequence (or at its end) and
   is scheduled whole or not at all: where chunks end decides which earlier tokens a chunk reads
   quantized (those that left the residual window), so fixed chunk ends make a sequence's tokens
   independent of the batch it runs in — solo and under load alike;
2. waiting sequences (preempted ones first, then by arrival) are admitted while the step has token
   room, ``max_num_seqs`` is not reached and the KV budget holds what they will need: the bytes of
   their whole prompt plus one token (`KVBudget.cost`), on top of what the running sequences hold
   and still need for their scheduled tokens;
3. when the running sequences alone outgrow the budget (decoding adds tokens), the newest one is
   preempted: its cache is dropped (blocks back to the pool, still findable by prefix) and it
   waits at the front of the queue to be recomputed — vLLM's recompute preemption. A sequence that
   is alone in the batch is never preempted (`LLMEngine.add_request` refuses a request that could
   not fit alone).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The sequences of one step, in the order of their tokens, and how many new tokens each."""

    sequences: list[Sequence]
    num_tokens: list[int]
    preempted: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.sequences)


class KVBudget:
    """A byte budget for everything the caches hold. ``cost(n)``: bytes of one sequence of ``n``
    tokens (the format's own size formula); ``peak(n)``: the most bytes it holds on the way to ``n``
    tokens (``cost`` is not monotonic: a block leaving the exact window shrinks it); ``used()``:
    bytes held now, measured (shared prefix blocks once); ``limit``: None for no budget."""

    def __init__(
        self,
        limit: int | None,
        cost: Callable[[int], int],
        peak: Callable[[int], int],
        used: Callable[[], int],
    ) -> None:
        self.limit, self.cost, self.peak, self.used = limit, cost, peak, used

    def growth(self, seq: Sequence, num_new: int) -> int:
        """The most bytes ``seq`` can add with ``num_new`` more tokens: its footprint goes from
        ``cost`` of its computed tokens to at most ``peak`` of the new count (blocks it shares with
        other sequences stay shared, so the measured total grows by no more)."""
        return max(0, self.peak(seq.num_computed + num_new) - self.cost(seq.num_computed))


def check_chunk_size(chunked_prefill_size: int | None, max_num_batched_tokens: int) -> None:
    """Raises ValueError when a prompt chunk of ``chunked_prefill_size`` tokens cannot fit in a step
    of ``max_num_batched_tokens`` (None: the default, half a step, always fits)."""
    if chunked_prefill_size is not None and not 1 <= chunked_prefill_size <= max_num_batched_tokens:
        raise ValueError(
            f"chunked_prefill_size: {chunked_prefill_size}; allowed: 1 to max_num_batched_tokens "
            f"({max_num_batched_tokens}), a chunk must fit in one step"
        )


class Scheduler:
    """Waiting and running sequences; `schedule` picks the next step (module docstring)."""

    def __init__(
        self,
        budget: KVBudget,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 512,
        preempt: Callable[[Sequence], None] | None = None,
        chunked_prefill_size: int | None = None,
    ) -> None:
        check_chunk_size(chunked_prefill_size, max_num_batched_tokens)
        self.budget = budget
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # None: half the step (room for decodes beside one chunk), as `LLMEngine` documents
        self.chunked_prefill_size = chunked_prefill_size or max(1, max_num_batched_tokens // 2)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempt_fn = preempt or (lambda seq: None)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.preempt_fn(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def chunk(self, seq: Sequence, room: int) -> int:
        """The new tokens ``seq`` computes this step given ``room`` tokens left: 1 while decoding; while
        prefilling, its tokens up to the next multiple of ``chunked_prefill_size`` (or its last), or
        0 when they do not fit in ``room`` (the chunk waits whole, its ends stay fixed)."""
        size = self.chunked_prefill_size
        end = min(seq.num_computed + seq.num_uncomputed, (seq.num_computed // size + 1) * size)
        n = end - seq.num_computed
        return n if n <= room else 0

    def schedule(self, admit: Callable[[Sequence], None]) -> ScheduledBatch:
        """The next step. ``admit(seq)`` gives a waiting sequence its cache (and prefix-cache hit,
        which sets ``seq.num_computed``) before its first chunk is planned."""
        preempted: list[Sequence] = []
        limit = self.budget.limit
        tokens_left = self.max_num_batched_tokens
        # a sequence that failed a batched forward runs alone until it succeeds (it may be the culprit)
        suspect = next((s for s in self.running if s.failures), None)
        if suspect is not None:
            return ScheduledBatch([suspect], [self.chunk(suspect, tokens_left)], preempted)
        while True:
            plan: list[tuple[Sequence, int]] = []
            left = tokens_left
            for seq in sorted(self.running, key=lambda s: s.arrival):
                if left <= 0:
                    break
                n = self.chunk(seq, left)
                if n:
                    plan.append((seq, n))
                    left -= n
            need = sum(self.budget.growth(s, n) for s, n in plan)
            if limit is None or len(self.running) <= 1 or self.budget.used() + need <= limit:
                break
            newest = max(self.running, key=lambda s: s.arrival)
            self._preempt(newest)
            preempted.append(newest)
        held = (self.budget.used() if limit is not None else 0) + need
        # the running sequences still need the rest of their prompts — also those whose chunk did not
        # fit in this step: keep room for it
        planned = {id(s): n for s, n in plan}
        reserved = sum(
            self.budget.growth(s, s.num_uncomputed + 1) - self.budget.growth(s, planned.get(id(s), 0))
            for s in self.running
        )
        tokens_left = left
        while self.waiting and tokens_left > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            want = self.budget.peak(seq.num_tokens + 1)
            if limit is not None and self.running and held + reserved + want > limit:
                break
            if not self.chunk(seq, tokens_left):  # (a prefix hit at admission only shortens the chunk)
                break
            self.waiting.popleft()
            admit(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self.chunk(seq, tokens_left)
            plan.append((seq, n))
            tokens_left -= n
            grow = self.budget.growth(seq, n)
            held += grow
            reserved += self.budget.growth(seq, seq.num_uncomputed + 1) - grow
        return ScheduledBatch([s for s, _ in plan], [n for _, n in plan], preempted)
