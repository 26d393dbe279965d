"""What a benchmark run holds: the bytes of any transformers cache, and the process's peak memory.

KV bytes. A cache that knows its own size (``SqueezedCache.nbytes()``) is asked. Any other cache
(transformers' `DynamicCache`, `QuantizedCache`, ...) is measured by walking, best effort, the
attributes of each of its layers: plain tensors count the bytes of their storage (a view counts
the whole buffer it keeps alive, each buffer once); tensor subclasses that flatten into inner
tensors (quanto's ``QBitsTensor`` and its packed ``_data``) are walked into; tuples, lists and
dicts are walked (HQQ keeps ``(codes, meta)`` with scale and zero tensors in ``meta``). Objects
of other kinds (optimizers, dtypes) are not entered.

Peak memory. Linux keeps a resident-set high-water mark (``VmHWM`` in ``/proc/self/status``)
that a process may reset by writing ``5`` to ``/proc/self/clear_refs``. `RssPeak` frees what it
can (``gc``, glibc ``malloc_trim``), reads the resident set, resets the mark, and after the run
reports the mark's growth over the starting resident set: every byte of the process (weights
excluded, as they were resident before), activations, cache, scratch and allocator slack alike.
Without the reset (not Linux, or not permitted) it falls back to the lifetime peak (``VmHWM`` or
``ru_maxrss``), whose growth is only seen when the run sets a new peak; ``source`` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def held_tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensor storages reachable from ``obj`` (see module docstring), each once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:
            names, _ = flatten()
            return sum(held_tensor_bytes(getattr(obj, name), seen) for name in names)
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(held_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_tensor_bytes(v, seen) for v in obj)
    return 0


def store_tensor_bytes(stores: Iterable[Any]) -> int:
    """Bytes of the distinct tensor storages kvsqueeze layer stores hold, found by walking their
    buffers' ``tensors()`` (exact data, chunks, pages, pending tokens) rather than by their own
    ``nbytes`` bookkeeping, which it checks."""
    tensors: list[torch.Tensor] = []
    for store in stores:
        for buf in store.buffers():
            tensors += buf.tensors()
    return held_tensor_bytes([t for t in tensors if t is not None])


def cache_nbytes(cache: Any) -> tuple[int, str]:
    """(bytes the cache holds, how they were measured): its own ``nbytes()``, else a tensor walk."""
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own()), "nbytes()"
    seen: set[int] = set()
    return sum(held_tensor_bytes(vars(layer), seen) for layer in cache.layers), "tensor walk"


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (0 when it cannot be read)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _lifetime_peak() -> tuple[int, str]:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def _release_free_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    # Not glibc: the allocator keeps its free memory, and the growth may read lower.
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(libc_name).malloc_trim(0)


@dataclass(frozen=True)
class PeakMemory:
    """Resident memory of one run, in bytes: at its start, and the high-water mark during it."""

    start_rss_bytes: int
    peak_rss_bytes: int
    source: str

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)


class RssPeak:
    """Context manager measuring a block's resident high-water mark (see module docstring).

    ``with RssPeak() as peak: run()`` then ``peak.result`` is a `PeakMemory`.
    """

    def __enter__(self) -> RssPeak:
        _release_free_memory()
        self.start = current_rss()
        try:
            CLEAR_REFS.write_text("5")
            self.reset = _status_kib("VmHWM") is not None
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        peak, name = _lifetime_peak()
        source = f"{name} reset per run" if self.reset else f"{name} since process start"
        self.result = PeakMemory(self.start, peak, source)
