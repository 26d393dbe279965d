"""Memory: what a run will need, estimated from the model's config before the weights load, and what
this machine has available, so that a run that cannot fit is refused up front (`check_speed_memory`,
`check_capacity_memory`), naming the flag, its value and the largest value that fits; and
`is_out_of_memory`, which recognises an allocation failure during a run (the estimate is rough).

The estimate of one speed run (batch ``b``, context ``c``, ``n`` new tokens) is a lower bound:

* weights: the parameters of a dense decoder (attention and gated MLP projections, embeddings, an
  untied output head) in the run's dtype;
* KV cache: the method's own size formula at ``c + n - 1`` tokens (`eval.capacity.predictor`), or
  its nominal bits per element when it has none (transformers' QuantizedCache, token policies);
* activations of the prefill: per prompt token, the hidden state, its norm and the attention output
  (``4 x hidden_size``), the gated MLP (``3 x intermediate_size``), queries and one layer's exact
  keys and values, in the run's dtype (attention scores, which SDPA computes in tiles, are not counted).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..quant.exact import ExactSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
OOM_PHRASES = ("can't allocate memory", "out of memory", "failed to allocate", "not enough memory")


def size_text(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit that keeps it >= 1, e.g. ``21.9 GiB``."""
    if num_bytes >= 2**40 * 10**15:  # beyond floats' reach: its order of magnitude
        return f"~10^{len(str(int(num_bytes) // 2**40)) - 1} TiB"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes:,.0f} B"


def available_memory() -> tuple[int | None, str]:
    """(bytes of memory this process can still take, where that number comes from); None when the
    system does not say. The smaller of the system's available memory (``MemAvailable`` of
    /proc/meminfo, else the free pages of ``os.sysconf``) and the room left under a cgroup v2 limit
    (containers, CI runners)."""
    found: list[tuple[int, str]] = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable of /proc/meminfo"))
                break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            pages, page = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            if pages > 0 and page > 0:
                found.append((pages * page, "free memory pages (os.sysconf)"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit.isdigit():
            used = int((CGROUP / "memory.current").read_text().strip())
            found.append((max(0, int(limit) - used), "the cgroup's memory.max - memory.current"))
    except (OSError, ValueError):
        pass
    if not found:
        return None, "unknown"
    return min(found)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: MemoryError, torch's OutOfMemoryError, or the
    RuntimeError of torch's CPU allocator (``DefaultCPUAllocator: can't allocate memory``)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(p in str(err).lower() for p in OOM_PHRASES)


def _dims(model_config: Any) -> tuple[Any, int, int, int, int, int]:
    """(text config, hidden, heads, kv_heads, head_dim, intermediate) of a decoder's config."""
    cfg = model_config.get_text_config(decoder=True)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    return cfg, hidden, heads, kv_heads, head_dim, inter


def weight_bytes(model_config: Any, dtype_bytes: int) -> int:
    """Bytes of a dense decoder's weights from its config (a lower bound for other architectures)."""
    cfg, hidden, heads, kv_heads, head_dim, inter = _dims(model_config)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    embeddings = cfg.vocab_size * hidden * (1 if getattr(cfg, "tie_word_embeddings", True) else 2)
    return (cfg.num_hidden_layers * (attention + 3 * hidden * inter) + embeddings) * dtype_bytes


def activation_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """Bytes of prefill activations per prompt token (see the module docstring)."""
    _, hidden, heads, kv_heads, head_dim, inter = _dims(model_config)
    return (4 * hidden + 3 * inter + heads * head_dim + 2 * kv_heads * head_dim) * dtype_bytes


def kv_bytes(method: Any, model_config: Any, dtype_bytes: int) -> Callable[[int, int], int]:
    """``bytes(num_tokens, batch_size)`` of the method's cache: its size formula, else its nominal
    bits per element."""
    from ..eval.capacity import KVShape, predictor

    cfg = model_config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elements = 2 * cfg.num_hidden_layers * heads * head_dim  # keys and values of one token
    try:
        predict = predictor(method, KVShape.from_config(model_config), dtype_bytes, model_config)
    except ValueError:  # sliding-window layers: no size formula
        predict = None
    if predict is not None:
        return predict
    bits = min(float(method.bits_per_element), 8.0 * dtype_bytes)
    return lambda n, b: int(elements * n * b * bits / 8)


@dataclass(frozen=True)
class RunNeed:
    """The memory one speed run needs, by part (bytes)."""

    weights: int
    kv: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations

    def describe(self) -> str:
        return (
            f"about {size_text(self.total)} (weights {size_text(self.weights)}, KV cache {size_text(self.kv)}, "
            f"activations {size_text(self.activations)})"
        )


def run_need(
    method: Any, model_config: Any, dtype: str, batch: int, context: int, new_tokens: int
) -> RunNeed:
    """The `RunNeed` of one speed run of ``method``."""
    size = DTYPE_BYTES[dtype]
    tokens = context + new_tokens - 1
    try:
        kv = kv_bytes(method, model_config, size)(tokens, batch)
    except OverflowError:  # a batch or context beyond floats: the exact cache's bytes, in integers
        cfg = model_config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = (
            ExactSpec.for_itemsize(size).kv_bytes_per_token(cfg.num_hidden_layers, heads, head_dim)
            * tokens
            * batch
        )
    acts = batch * context * activation_bytes_per_token(model_config, size)
    return RunNeed(weight_bytes(model_config, size), kv, acts)


def _largest(fits: Callable[[int], bool], start: int) -> int:
    """Largest ``n`` in [0, start] with ``fits(n)`` (``fits`` true up to some n, then false)."""
    low, high = 0, start
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return high if fits(high) else low


def check_speed_memory(
    methods: list[Any],
    model_config: Any,
    dtype: str,
    batch_sizes: tuple[int, ...],
    contexts: tuple[int, ...],
    new_tokens: int,
    available: tuple[int | None, str] | None = None,
) -> None:
    """Refuse (ValueError) a speed grid whose largest run cannot fit in the memory available here
    (``available``: `available_memory` when not given), naming --batch-sizes and the largest batch
    size that fits at the longest context; when not even batch size 1 fits there, --contexts and the
    longest context that fits at batch size 1; --model when its weights do not fit."""
    free, source = available if available is not None else available_memory()
    if free is None:
        return
    longest, biggest = max(contexts), max(batch_sizes)
    smaller = "a smaller model" + (" or --dtype bfloat16" if dtype == "float32" else "")

    def need(method: Any, batch: int, context: int) -> RunNeed:
        return run_need(method, model_config, dtype, batch, context, new_tokens)

    worst = max(methods, key=lambda m: need(m, biggest, longest).total)
    needed = need(worst, biggest, longest)
    if needed.total <= free:
        return
    here = f"the {size_text(free)} of memory available here ({source})"
    if needed.weights > free:
        raise ValueError(
            f"--model: its weights alone need about {size_text(needed.weights)} in {dtype}, more than {here}; "
            f"allowed: {smaller}"
        )

    def fits(batch: int, context: int) -> bool:
        return all(need(m, batch, context).total <= free for m in methods)

    most = _largest(lambda batch: fits(batch, longest), biggest)
    if most >= 1:  # batch size 1 fits every context: the batch sizes are too large
        bad = min(b for b in batch_sizes if not fits(b, longest))
        worst = max(methods, key=lambda m: need(m, bad, longest).total)
        raise ValueError(
            f"--batch-sizes: {bad} is not allowed: {worst.name} at batch size {bad} and context {longest} "
            f"(+ {new_tokens} new tokens) needs {need(worst, bad, longest).describe()}, more than {here}; "
            f"allowed: batch sizes up to {most} at --contexts {longest}, e.g. --batch-sizes "
            f"{','.join(map(str, sorted({1, most})))}"
        )
    most = _largest(lambda context: fits(1, context), longest)
    if most < 1:
        raise ValueError(
            f"--model: its weights and a 1-token run need {need(worst, 1, 1).describe()}, more than {here}; "
            f"allowed: {smaller}"
        )
    bad = min(c for c in contexts if not fits(1, c))
    worst = max(methods, key=lambda m: need(m, 1, bad).total)
    raise ValueError(
        f"--contexts: {bad} is not allowed: {worst.name} at batch size 1 and context {bad} (+ {new_tokens} new "
        f"tokens) needs {need(worst, 1, bad).describe()}, more than {here}; allowed: contexts up to {most} at "
        f"batch size 1, e.g. --contexts {most} --batch-sizes 1"
    )


def check_capacity_memory(
    methods: list[Any],
    model_config: Any,
    dtype: str,
    batch_sizes: tuple[int, ...],
    budget: int,
    text: str,
    available: tuple[int | None, str] | None = None,
) -> None:
    """Refuse (ValueError naming --memory-budget) a capacity report whose caches, each filled up to
    ``budget`` bytes (or to the model's context), cannot be allocated in the memory available here."""
    from ..eval.capacity import KVShape

    free, source = available if available is not None else available_memory()
    if free is None or budget <= free:
        return
    size = DTYPE_BYTES[dtype]
    try:
        limit = KVShape.from_config(model_config).max_tokens
    except ValueError:
        return  # refused later, with its own message

    def filled(method: Any, batch: int) -> int:  # bytes of one cache filled to the budget or the context
        try:
            return (
                budget if limit is None else min(budget, kv_bytes(method, model_config, size)(limit, batch))
            )
        except OverflowError:
            return budget

    largest = max(filled(m, b) for m in methods for b in batch_sizes)
    if largest > free:
        raise ValueError(
            f"--memory-budget: {text!r} is not allowed: the capacity check allocates each cache up to the budget, "
            f"about {size_text(largest)} here, more than the {size_text(free)} of memory available ({source}); "
            f"allowed: at most {size_text(free)}, e.g. --memory-budget {max(1, int(free / 2**30 / 2))}GiB"
        )
