"""What a result file says: the method that ran, its sizes, the run's hardware, versions and git
revision; saving results with their config.

A *method record* (`method_record`) describes one cache as it ran, in every result file of
``eval``, ``demo``, ``bench`` and ``calibrate``::

    {"name": "best-3bit",            # the method as the user named it
     "cache": "SqueezedCache",       # the cache class: SqueezedCache, DynamicCache, QuantizedCache
     "config": {...},                # SqueezedCache: CacheConfig.to_dict() of the config the cache
                                     # held (bundled calibration, head_dim-fitted groups); else None
     "read_path": "reference",       # SqueezedCache: "fused" or "reference"; else None
     "options": {},                  # other caches' constructor options (QuantizedCache: backend, nbits, ...)
     "bits_per_element": 3.5,        # the sizes `kvsqueeze presets` shows (`config_sizes`)
     "bytes_per_token": 5040.0,
     "fraction_of_fp16": 0.219}

``CacheConfig.from_dict(record["config"])`` (`record_config`) is the exact config that ran.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..quant.exact import FP16

if TYPE_CHECKING:
    from ..config import CacheConfig

EXACT_BITS = 16
"""Exact (unquantized) elements are counted at 16 bits, as an fp16/bf16 cache stores them."""


def kv_shape(model_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config (its decoder text config)."""
    cfg = model_config.get_text_config(decoder=True)
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, num_kv_heads, head_dim


def config_sizes(cache_config: CacheConfig, model_config: Any) -> dict[str, float]:
    """The sizes of ``cache_config`` on this model, as `kvsqueeze presets`, ``inspect`` and ``eval``
    show them: ``bits_per_element`` (stored bits per K/V element of the packed history, scales and
    zero points included, exact elements at 16 bits, per-layer configs averaged over the model's
    layers), ``bytes_per_token`` (the same over all layers, keys and values) and
    ``fraction_of_fp16`` (``bytes_per_token`` over an fp16 cache's). The fixed exact sinks and
    residual window are not included; `SqueezedCache.nbytes` counts everything held."""
    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    per_token = cache_config.bytes_per_token(num_layers, num_kv_heads, head_dim, exact_bytes=FP16)
    return {
        "bits_per_element": cache_config.bits_per_element(exact_bits=EXACT_BITS, num_layers=num_layers),
        "bytes_per_token": per_token,
        "fraction_of_fp16": per_token / FP16.kv_bytes_per_token(num_layers, num_kv_heads, head_dim),
    }


def nominal_sizes(bits_per_element: float, model_config: Any) -> dict[str, float]:
    """`config_sizes` of a cache without a `CacheConfig` (transformers' caches), from its nominal
    stored bits per K/V element."""
    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    elements = 2 * num_layers * num_kv_heads * head_dim
    return {
        "bits_per_element": float(bits_per_element),
        "bytes_per_token": bits_per_element * elements / 8,
        "fraction_of_fp16": bits_per_element / EXACT_BITS,
    }


def method_record(
    name: str,
    cache_config: CacheConfig | None,
    model_config: Any,
    *,
    cache: str = "SqueezedCache",
    read_path: str | None = None,
    options: dict[str, Any] | None = None,
    bits_per_element: float = EXACT_BITS,
) -> dict[str, Any]:
    """The record of one method as it ran (see the module docstring).

    Args:
        name: the method as the user named it (``best-3bit``, ``my.json``, ``exact``).
        cache_config: the config the cache held (``SqueezedCache.cache_config``), not the name's
            generic preset; None for caches without one.
        model_config: the model's transformers config (sizes depend on its KV shape).
        cache: the cache class name.
        read_path: ``"fused"`` or ``"reference"`` for a `SqueezedCache`.
        options: constructor options of a cache without a `CacheConfig`.
        bits_per_element: nominal bits per element of a cache without a `CacheConfig`.
    """
    sizes = (
        nominal_sizes(bits_per_element, model_config)
        if cache_config is None
        else config_sizes(cache_config, model_config)
    )
    return {
        "name": name,
        "cache": cache,
        "config": None if cache_config is None else cache_config.to_dict(),
        "read_path": read_path,
        "options": dict(options or {}),
        **sizes,
    }


def record_config(record: dict[str, Any]) -> CacheConfig | None:
    """The `CacheConfig` a `method_record` says ran (None for caches without one)."""
    from ..config import CacheConfig

    return None if record["config"] is None else CacheConfig.from_dict(record["config"])


def git_revision(path: Path | None = None) -> str:
    """Short git revision of the working tree (with '+dirty' when modified), or 'unknown'."""
    cwd = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True
        ).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Hardware and software the numbers were measured on."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_revision(),
    }


def save_results(path: str | Path, config: dict[str, Any], results: Any) -> Path:
    """Write ``{"config", "environment", "results"}`` as JSON; return the path.

    The JSON is built before the file is opened, so a value that cannot be written leaves no half
    file; when the file cannot be written after all (the disk filled up, the folder went away), the
    results go to the temporary folder and the ValueError says where, so a long run is never lost.
    """
    path = Path(path)
    payload = {"config": config, "environment": environment(), "results": results}
    text = json.dumps(payload, indent=2, default=str)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        fallback = Path(tempfile.mkstemp(prefix="kvsqueeze-", suffix=f"-{path.name}")[1])
        fallback.write_text(text)
        raise ValueError(
            f"out: {str(path)!r} cannot be written ({err.strerror or err}); the results were saved to {fallback}"
        ) from None
    return path
