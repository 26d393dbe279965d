"""Methods to compare, by name: the exact cache, kvsqueeze presets or configs, transformers baselines.

Names:
* ``exact`` — transformers' `DynamicCache` (the reference every number is measured against);
* a kvsqueeze preset (``int8``, ``k4v4``, ...) or a path to a JSON `CacheConfig` (``my.json``);
* ``quanto-int4``, ``quanto-int2``, ``hqq-int4``, ``hqq-int2``, ... — transformers' `QuantizedCache`
  (group 64, residual 128, its defaults otherwise); needs the optional backend package.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, CacheConfig

BASELINE_BACKENDS = {
    "quanto": ("optimum.quanto", "optimum-quanto", (2, 4)),
    "hqq": ("hqq", "hqq", (1, 2, 3, 4, 8)),
}


@dataclass(frozen=True)
class Method:
    """A named way to build the cache of one sequence (or batch)."""

    name: str
    make_cache: Callable[[Any], Any] = field(repr=False)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config}


def _exact(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _squeezed(config: CacheConfig) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        from ..integrations.cache import SqueezedCache

        return SqueezedCache.from_model(model, config)

    return make


def _baseline(backend: str, bits: int) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        from transformers import QuantizedCache

        return QuantizedCache(backend, model.config, nbits=bits, q_group_size=64, residual_length=128)

    return make


def baseline_available(name: str) -> tuple[bool, str]:
    """Whether a transformers-baseline method can run here, and why not."""
    backend = name.split("-", 1)[0]
    module, package, _ = BASELINE_BACKENDS[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return (
            False,
            f"{name}: skipped, the optional package '{package}' is not installed (pip install {package})",
        )
    return True, ""


def resolve_method(name: str) -> Method:
    """The `Method` for ``name``; ValueError naming the value and the allowed names otherwise."""
    if name == "exact":
        return Method("exact", _exact, {"cache": "DynamicCache"})
    if name in PRESETS:
        return Method(name, _squeezed(PRESETS[name]), PRESETS[name].to_dict())
    backend, _, rest = name.partition("-int")
    if backend in BASELINE_BACKENDS and rest.isdigit():
        bits = int(rest)
        allowed_bits = BASELINE_BACKENDS[backend][2]
        if bits not in allowed_bits:
            raise ValueError(f"method: {name!r} has {bits} bits; {backend} allows {list(allowed_bits)}")
        cfg = {
            "cache": "QuantizedCache",
            "backend": backend,
            "nbits": bits,
            "q_group_size": 64,
            "residual_length": 128,
        }
        return Method(name, _baseline(backend, bits), cfg)
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"method: config file {name!r} does not exist")
        config = CacheConfig.from_dict(json.loads(path.read_text()))
        return Method(path.stem, _squeezed(config), config.to_dict())
    allowed = ["exact", *PRESETS, "quanto-int2", "quanto-int4", "hqq-int<bits>", "<config>.json"]
    raise ValueError(f"method: {name!r} is unknown; allowed: {allowed}")


def resolve_methods(names: str | list[str]) -> list[Method]:
    """Methods from a comma-separated string or a list, validated before any work starts."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [resolve_method(n) for n in names]
