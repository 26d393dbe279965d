"""Passkey and needle-in-a-haystack retrieval through each cache method.

A prompt of exactly ``num_tokens`` tokens hides a random 5-digit key in filler text: the classic
repeated "The grass is green. The sky is blue. ..." (task ``passkey``) or WikiText paragraphs (task
``needle``, "The special magic number is 48213."). It is asked through the model's chat template, the
first digit of the key sitting at token position ``≈ depth * num_tokens`` (the needle goes to the
sentence boundary at most ``max(16, num_tokens // 32)`` tokens before that position, and never outside
the filler). The prompt is prefilled in chunks of ``chunk_tokens`` so that the question reads the
document from the cache, then ``new_tokens`` tokens are decoded greedily (12 by default: SmolLM2 spells
"The pass key is 48213." one digit per token); a trial is correct when the key's digits appear in the
answer's digits.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .generation import greedy_decode
from .methods import Method
from .progress import bar_disabled
from .quantized_reads import nothing_quantized_warning
from .report import record_config


@dataclass(frozen=True)
class RetrievalTask:
    """The words of one retrieval task; ``needle`` holds a ``{key}`` placeholder and starts with a space."""

    intro: str
    needle: str
    question: str


PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS: dict[str, RetrievalTask] = {
    "passkey": RetrievalTask(
        intro="There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the important information there.",
        needle=" The pass key is {key}. Remember it. {key} is the pass key.",
        question="What is the pass key? Answer with the number only.",
    ),
    "needle": RetrievalTask(
        intro="A special magic number is hidden in the text below. Find it and memorize it.",
        needle=" The special magic number is {key}.",
        question="What is the special magic number? Answer with the number only.",
    ),
}
_MARK = "\x00HAYSTACK\x00"


def _check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} is not allowed; it must be a number in [0, 1]")
    return float(depth)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _frame(tokenizer: Any, task: RetrievalTask) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: chat template (when the tokenizer has one), intro, question."""
    content = f"{task.intro}{_MARK}\n\n{task.question}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, after = text.split(_MARK)
        return _ids(tokenizer, before), _ids(tokenizer, after)
    before, after = content.split(_MARK)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, before), _ids(tokenizer, after + "\nAnswer:")


def instruction_spans(tokenizer: Any, task: str, num_tokens: int) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of a ``num_tokens`` prompt of ``task`` that are not haystack:
    the chat template, intro and question (to mark as instructions, see `SqueezedCache.set_roles`)."""
    before, after = _frame(tokenizer, TASKS[task])
    return [(0, len(before)), (num_tokens - len(after), num_tokens)]


def mark_instructions(cache: Any, tokenizer: Any, task: str, num_tokens: int) -> None:
    """Give a cache with a token policy the roles of a ``task`` prompt: template, intro and question
    are instructions, the haystack is text (a no-op for other caches)."""
    config = getattr(cache, "cache_config", None)
    if config is None or config.tokens is None:
        return
    from ..policies.roles import mark_spans

    roles = torch.zeros(1, num_tokens, dtype=torch.int8)
    cache.set_roles(mark_spans(roles, instruction_spans(tokenizer, task, num_tokens)))


def _needle(tokenizer: Any, task: RetrievalTask, key: str) -> tuple[list[int], int, int]:
    """Needle token ids and the ``[start, end)`` token span of the key's first occurrence within them."""
    text = task.needle.format(key=key)
    first, last = text.index(key), text.index(key) + len(key)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < last and b > first]
    return encoding["input_ids"], inside[0], inside[-1] + 1


def _sentence_start(tokenizer: Any, haystack: Sequence[int], position: int, max_back: int) -> int:
    """Largest ``p <= position`` (at most ``max_back`` back) whose previous token ends a sentence."""
    for p in range(position, max(position - max_back, 0) - 1, -1):
        if p == 0 or tokenizer.decode([haystack[p - 1]]).rstrip().endswith((".", "!", "?")):
            return p
    return position


def build_prompt(
    tokenizer: Any, task: str, haystack: Sequence[int], num_tokens: int, depth: float, key: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Hide ``key`` in ``haystack`` (token ids, at least as many as the filler needs) at ``depth``.

    Returns:
        ``(input_ids, (start, end))``: ``(1, num_tokens)`` long tensor and the token span of the key.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not allowed; allowed: {sorted(TASKS)}")
    depth = _check_depth(depth)
    before, after = _frame(tokenizer, TASKS[task])
    needle, key_start, key_end = _needle(tokenizer, TASKS[task], key)
    num_filler = num_tokens - len(before) - len(after) - len(needle)
    if num_filler < 1:
        minimum = num_tokens - num_filler + 1
        raise ValueError(
            f"length={num_tokens} is not allowed; the {task} prompt needs at least {minimum} tokens"
        )
    if len(haystack) < num_filler:
        raise ValueError(f"haystack: {len(haystack)} tokens, but length={num_tokens} needs {num_filler}")
    filler = list(haystack[:num_filler])
    cut = min(max(round(depth * num_tokens) - len(before) - key_start, 0), num_filler)
    cut = _sentence_start(tokenizer, filler, cut, max_back=max(16, num_tokens // 32))
    ids = before + filler[:cut] + needle + filler[cut:] + after
    assert len(ids) == num_tokens
    offset = len(before) + cut
    return torch.tensor([ids], dtype=torch.long), (offset + key_start, offset + key_end)


def random_key(seed: int) -> str:
    """The 5-digit key of trial ``seed``."""
    return str(random.Random(seed).randint(10_000, 99_999))


def make_passkey_prompt(
    tokenizer: Any, num_tokens: int, depth: float, seed: int
) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """Passkey prompt of ``num_tokens`` tokens: ``((1, num_tokens) input_ids, key, (start, end) key span)``."""
    filler = _ids(tokenizer, PASSKEY_FILLER)
    haystack = filler * (num_tokens // len(filler) + 1)
    key = random_key(seed)
    input_ids, span = build_prompt(tokenizer, "passkey", haystack, num_tokens, depth, key)
    return input_ids, key, span


def make_needle_prompt(
    tokenizer: Any, num_tokens: int, depth: float, seed: int, text_ids: torch.Tensor
) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """Needle prompt whose haystack starts at a seed-chosen offset of ``text_ids`` (``(num_text_tokens,)``).

    Returns ``((1, num_tokens) input_ids, key, (start, end) key span)``.
    """
    start = random.Random(seed).randrange(max(text_ids.numel() - num_tokens, 1))
    key = random_key(seed)
    haystack = text_ids[start : start + num_tokens].tolist()
    input_ids, span = build_prompt(tokenizer, "needle", haystack, num_tokens, depth, key)
    return input_ids, key, span


def is_correct(answer: str, key: str) -> bool:
    """True when the key's digits appear in the digits of ``answer`` (``"48 213"`` counts)."""
    return key in re.sub(r"\D", "", answer)


@dataclass(frozen=True)
class RetrievalSpec:
    """Which prompts are built and how each is run.

    Attributes:
        task: ``passkey`` or ``needle`` (see :data:`TASKS`).
        lengths: prompt lengths in tokens.
        depths: relative key positions in ``[0, 1]``.
        num_seeds: trials per (length, depth); trial ``seed`` uses key ``random_key(seed)``.
        new_tokens: greedy tokens decoded for the answer.
        chunk_tokens: prefill chunk size (the last chunk holds the question and attends to the cache).
    """

    task: str = "passkey"
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    num_seeds: int = 10
    new_tokens: int = 12
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not allowed; allowed: {sorted(TASKS)}")
        if not self.lengths or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths
        ):
            raise ValueError(f"lengths={self.lengths!r} is not allowed; give one or more integers >= 1")
        if not self.depths:
            raise ValueError("depths=() is not allowed; give one or more numbers in [0, 1]")
        for depth in self.depths:
            _check_depth(depth)
        for field in ("lengths", "depths"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"{field}={list(values)!r} is not allowed; values must be distinct")
        for field in ("num_seeds", "new_tokens", "chunk_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} is not allowed; it must be an integer >= 1")


def prompt_chunk_sizes(num_tokens: int, chunk_tokens: int) -> list[int]:
    """Tokens of each forward of a ``num_tokens`` prompt in `answer_ids`: prefill chunks of
    ``chunk_tokens``, then the last chunk (at most ``chunk_tokens``) that starts the answer."""
    last = (num_tokens - 1) // chunk_tokens * chunk_tokens  # start of the last chunk
    return [chunk_tokens] * (last // chunk_tokens) + [num_tokens - last]


def check_prompts(tokenizer: Any, spec: RetrievalSpec, text_ids: torch.Tensor | None) -> None:
    """Build one prompt of every length before any forward: a length too short for the task's
    words, or a needle text too short for a length, fails here (ValueError naming the field)."""
    for num_tokens in spec.lengths:
        make_prompt(tokenizer, spec, num_tokens, spec.depths[0], 0, text_ids)


def answer_ids(
    model: Any, input_ids: torch.Tensor, cache: Any, spec: RetrievalSpec, eos_ids: set[int]
) -> list[int]:
    """Prefill ``input_ids`` (``(1, num_tokens)``) chunk by chunk into ``cache``, then decode greedily.

    Returns the ``spec.new_tokens`` greedy token ids, cut before the first id in ``eos_ids``.
    """
    last = input_ids.shape[1] - prompt_chunk_sizes(input_ids.shape[1], spec.chunk_tokens)[-1]
    with torch.inference_mode():
        for start in range(0, last, spec.chunk_tokens):
            chunk = input_ids[:, start : start + spec.chunk_tokens]
            model(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1)
    tokens = greedy_decode(model, input_ids[:, last:], cache, spec.new_tokens).argmax.tolist()
    ends = [i for i, token in enumerate(tokens) if token in eos_ids]
    return tokens[: ends[0]] if ends else tokens


def make_prompt(
    tokenizer: Any,
    spec: RetrievalSpec,
    num_tokens: int,
    depth: float,
    seed: int,
    text_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """The prompt of one trial of ``spec.task`` (``text_ids`` is the needle task's haystack text)."""
    if spec.task == "passkey":
        return make_passkey_prompt(tokenizer, num_tokens, depth, seed)
    if text_ids is None:
        raise ValueError("text_file: the needle task needs a haystack text; pass its token ids")
    return make_needle_prompt(tokenizer, num_tokens, depth, seed, text_ids)


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    spec: RetrievalSpec,
    text_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (length, depth, seed) prompt through every method's cache.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer.
        text_ids: ``(num_text_tokens,)`` haystack token ids, needed by the ``needle`` task only.

    Returns:
        One dict per (method, length, depth), in that nesting order: ``method``, ``length``, ``depth``,
        ``quantized_tokens`` and ``warning`` (`quantized_counts`), ``num_trials``, ``num_correct``,
        ``accuracy``, ``mean_key_depth`` (measured key position / length), ``seconds`` and ``trials``
        (``seed``, ``key``, ``answer``, ``correct``, ``key_position``). What each method ran is
        `Method.record` (the command saves it beside the rows).
    """
    from ..integrations.context import context_limit

    limit = context_limit(model.config.get_text_config(decoder=True))
    longest = max(spec.lengths) + spec.new_tokens
    if limit.tokens and longest > limit.tokens:
        raise ValueError(
            f"lengths={list(spec.lengths)} is not allowed; length + new_tokens ({longest}) exceeds the "
            f"model's context of {limit.tokens} tokens ({limit.source})"
        )
    check_prompts(tokenizer, spec, text_ids)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    cells: dict[tuple[str, int, float], dict[str, Any]] = {
        (m.name, n, d): {
            "method": m.name,
            "length": n,
            "depth": d,
            **quantized_counts(m, record, n, spec),
            "seconds": 0.0,
            "trials": [],
        }
        for m, record in zip(methods, [m.record(model) for m in methods], strict=True)
        for n in spec.lengths
        for d in spec.depths
    }
    total = len(methods) * len(spec.lengths) * len(spec.depths) * spec.num_seeds
    with tqdm(
        total=total, desc=f"{spec.task} retrieval", unit="trial", disable=bar_disabled(progress)
    ) as bar:
        for num_tokens in spec.lengths:
            for depth in spec.depths:
                for seed in range(spec.num_seeds):
                    input_ids, key, (key_position, _) = make_prompt(
                        tokenizer, spec, num_tokens, depth, seed, text_ids
                    )
                    input_ids = input_ids.to(model.device)
                    for method in methods:
                        start = time.perf_counter()
                        cache = method.make_cache(model)
                        mark_instructions(cache, tokenizer, spec.task, num_tokens)
                        ids = answer_ids(model, input_ids, cache, spec, eos_ids)
                        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                        cell = cells[(method.name, num_tokens, depth)]
                        cell["seconds"] += time.perf_counter() - start
                        cell["trials"].append(
                            {
                                "seed": seed,
                                "key": key,
                                "answer": text,
                                "correct": is_correct(text, key),
                                "key_position": key_position,
                            }
                        )
                        bar.update(1)
    return [_summarize(cell) for cell in cells.values()]


def quantized_counts(method: Method, record: dict[str, Any], num_tokens: int, spec: RetrievalSpec) -> dict:
    """``quantized_tokens``: the tokens the last forward of a ``num_tokens`` trial (prompt chunks,
    then the answer's greedy steps) reads quantized, the most any step of the answer reads (None for
    caches that keep every token exact), and a ``warning`` when a lossy method read none."""
    config = record_config(record)
    chunk_sizes = prompt_chunk_sizes(num_tokens, spec.chunk_tokens) + [1] * (spec.new_tokens - 1)
    quantized = method.quantized_tokens(config, chunk_sizes)
    warning = None
    if quantized == 0:
        warning = nothing_quantized_warning(method.name, config, chunk_sizes, "trial")
    return {"quantized_tokens": quantized, "warning": warning}


def _summarize(cell: dict[str, Any]) -> dict[str, Any]:
    trials = cell["trials"]
    num_correct = sum(t["correct"] for t in trials)
    mean_position = sum(t["key_position"] for t in trials) / len(trials)
    return {
        **{k: cell[k] for k in ("method", "length", "depth", "quantized_tokens", "warning")},
        "num_trials": len(trials),
        "num_correct": num_correct,
        "accuracy": num_correct / len(trials),
        "mean_key_depth": mean_position / cell["length"],
        "seconds": cell["seconds"],
        "trials": trials,
    }
