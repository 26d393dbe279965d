"""Generation speed through a cache over a grid of methods x contexts x batch sizes.

One run: a fresh cache, a prefill of ``(batch, context)`` prompt tokens (the first output token;
its time is the TTFT), then ``new_tokens - 1`` greedy decode steps of ``(batch, 1)`` tokens (their
mean time is the TPOT, time per output token). Decode tokens/s is ``batch / TPOT``; prefill
tokens/s is ``batch * context / TTFT``. Per grid cell, the methods run interleaved, repeat after
repeat, so that drift of a shared machine hits them alike; every metric is the median of its own
runs (all runs are kept). Warm-up: ``warmup`` untimed runs of every method at every batch size,
at the smallest context, before that batch size's timed runs (first-call costs: lazy imports and
kernels, allocator growth).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .memory import PeakMemory, RssPeak, cache_nbytes
from .methods import Method
from .progress import bar_disabled

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchConfig:
    """The speed grid. Validated here; the ``bench`` command is a view of it.

    ``threads``: torch intra-op threads for the run (None: torch's default, usually one per core).
    """

    model: str
    methods: tuple[str, ...]
    contexts: tuple[int, ...] = (512, 2048, 4096)
    batch_sizes: tuple[int, ...] = (1, 4)
    new_tokens: int = 16
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"
    text_file: str | None = None
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("methods", "contexts", "batch_sizes"):  # lists (from JSON) become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, low in (("new_tokens", 2), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} must be an integer >= {low}")
        for name in ("methods", "contexts", "batch_sizes"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')}: empty; give at least one value")
        for name in ("contexts", "batch_sizes"):
            values = getattr(self, name)
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise ValueError(f"--{name.replace('_', '-')}: {bad} are not allowed; allowed: integers >= 1")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name.replace('_', '-')}: {list(values)} repeat a value; give each once")
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise ValueError(f"--methods: {repeated} given more than once; give each method once")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: {self.dtype!r} is not supported; allowed: {list(DTYPES)}")
        threads = self.threads
        most = 4 * (os.cpu_count() or 1)
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most
        ):
            raise ValueError(
                f"--threads: {self.threads!r} must be an integer from 1 to {most} (4 x the {most // 4} cores here; "
                "omit it for torch's default)"
            )

    def check_context(self, max_tokens: int | None, source: str = "max_position_embeddings") -> None:
        """Raise if a context plus the generated tokens exceeds the model's ``max_tokens`` (from ``source``)."""
        for context in self.contexts:
            held = context + self.new_tokens - 1
            if max_tokens and held > max_tokens:
                raise ValueError(
                    f"--contexts: {context} + --new-tokens {self.new_tokens} - 1 = {held} tokens exceed the "
                    f"model's context of {max_tokens} ({source}); allowed contexts: <= "
                    f"{max_tokens - self.new_tokens + 1}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


def model_loader(name: str, dtype: str) -> Callable[[Method], Any]:
    """``model_for(method)``: the model, loaded once per attention implementation a method asks for
    (its ``attn_implementation`` attribute when it has one; None: the model's default)."""
    from ..models import load_model

    models: dict[str | None, Any] = {}

    def model_for(method: Method) -> Any:
        implementation = getattr(method, "attn_implementation", None)
        if implementation not in models:
            models[implementation] = load_model(
                name, dtype=DTYPES[dtype], attn_implementation=implementation
            )[0]
        return models[implementation]

    return model_for


def batch_prompt(
    ids: torch.Tensor | None, batch_size: int, context: int, vocab_size: int, seed: int
) -> torch.Tensor:
    """(batch, context) prompt ids: ``batch_size`` different slices of ``ids`` (num_tokens,), disjoint
    when long enough, else evenly spread; uniform random ids when ``ids`` is None or too short."""
    if ids is None or len(ids) < context:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch_size, context), generator=generator)
    if batch_size * context <= len(ids):
        starts = [i * context for i in range(batch_size)]
    else:
        span = len(ids) - context
        starts = [round(i * span / max(batch_size - 1, 1)) for i in range(batch_size)]
    return torch.stack([ids[s : s + context] for s in starts])


@dataclass(frozen=True)
class RunResult:
    """One timed run: prefill and decode seconds, what the cache held after it, peak memory."""

    ttft_s: float
    decode_s: float
    decode_steps: int
    kv_bytes: int
    kv_bytes_source: str
    kv_tokens: int
    memory: PeakMemory

    @property
    def tpot_s(self) -> float:
        return self.decode_s / self.decode_steps


@torch.inference_mode()
def time_run(model: Any, cache: Any, prompt: torch.Tensor, new_tokens: int) -> RunResult:
    """Prefill ``prompt`` (batch, context) into ``cache``, then ``new_tokens - 1`` greedy steps."""
    with RssPeak() as peak:
        start = time.perf_counter()
        out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - start
    kv_bytes, source = cache_nbytes(cache)
    return RunResult(ttft, decode, new_tokens - 1, kv_bytes, source, cache.get_seq_length(), peak.result)


def summarize(method: str, context: int, batch_size: int, runs: list[RunResult]) -> dict:
    """One grid cell: medians of every metric over ``runs``, all runs, bytes held and peak memory."""
    metrics = {
        "ttft_s": [r.ttft_s for r in runs],
        "tpot_s": [r.tpot_s for r in runs],
        "decode_tokens_per_s": [batch_size / r.tpot_s for r in runs],
        "prefill_tokens_per_s": [batch_size * context / r.ttft_s for r in runs],
        "peak_rss_growth_bytes": [r.memory.growth_bytes for r in runs],
    }
    row: dict[str, Any] = {"method": method, "context": context, "batch_size": batch_size}
    for name, values in metrics.items():
        row[name] = statistics.median(values)
        row[name + "_runs"] = values
    last = runs[-1]
    row.update(
        kv_bytes=last.kv_bytes,
        kv_bytes_source=last.kv_bytes_source,
        kv_tokens=last.kv_tokens,
        peak_rss_bytes=max(r.memory.peak_rss_bytes for r in runs),
        memory_source=last.memory.source,
    )
    return row


def run_grid(
    config: BenchConfig,
    methods: list[Method],
    model_for: Callable[[Method], Any],
    ids: torch.Tensor | None,
    progress: bool = True,
    on_cell: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Rows (one per batch size x context x method, in that order) of `summarize`.

    ``on_cell(rows)`` is called with the rows so far after every finished cell (e.g. to save them,
    so that an interrupted grid keeps what it measured).
    """
    vocab = model_for(methods[0]).config.get_text_config(decoder=True).vocab_size
    timed = len(config.contexts) * config.repeats
    total = len(config.batch_sizes) * len(methods) * (config.warmup + timed)
    rows = []
    with tqdm(total=total, desc="bench", disable=bar_disabled(progress)) as bar:

        def run(method: Method, prompt: torch.Tensor, label: str) -> RunResult:
            bar.set_postfix_str(f"{label} {method.name} batch {prompt.shape[0]} context {prompt.shape[1]}")
            model = model_for(method)
            result = time_run(model, method.make_cache(model), prompt, config.new_tokens)
            bar.update()
            return result

        for batch in config.batch_sizes:
            small = batch_prompt(ids, batch, min(config.contexts), vocab, config.seed)
            for _ in range(config.warmup):
                for method in methods:
                    run(method, small, "warm-up")
            for context in config.contexts:
                prompt = batch_prompt(ids, batch, context, vocab, config.seed)
                runs: dict[str, list[RunResult]] = {m.name: [] for m in methods}
                for r in range(config.repeats):
                    for method in methods:
                        runs[method.name].append(run(method, prompt, f"run {r + 1}/{config.repeats}"))
                rows.extend(summarize(m.name, context, batch, runs[m.name]) for m in methods)
                if on_cell is not None:
                    on_cell(rows)
    return rows
