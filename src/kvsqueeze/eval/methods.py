"""Methods to compare, by name: the exact cache, kvsqueeze presets or configs, transformers baselines.

Names:
* ``exact`` — transformers' `DynamicCache` (the reference every number is measured against);
* a kvsqueeze preset (``int8``, ``k4v4``, ...) or a path to a JSON `CacheConfig` (``my.json``);
  with ``@fused`` (``k4v4@fused``) its fused read path: the model's attention is switched to
  ``attn_implementation="kvsqueeze"`` (which runs plain SDPA for every other cache, so methods
  compared on the same model are unaffected); without it, the reference read path (token policies
  that score by attention always take the fused one); the native kernels read every config
  (``best-*`` included, issue 16);
* ``quanto-int4``, ``quanto-int2``, ``hqq-int4``, ``hqq-int2``, ... — transformers' `QuantizedCache`
  (group 64, residual 128, its defaults otherwise); needs the optional backend package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, TOKEN_PRESETS, CacheConfig, preset, resolve_config
from .quantized_reads import QuantizedCounter, baseline_quantized_reads, squeezed_quantized_reads
from .report import kv_shape, method_record

BASELINE_BACKENDS = {
    "quanto": ("optimum.quanto", "optimum-quanto", (2, 4)),
    "hqq": ("hqq", "hqq", (1, 2, 3, 4, 8)),
}
BASELINE_GROUP_SIZE = 64
BASELINE_RESIDUAL_LENGTH = 128
FUSED_SUFFIX = "@fused"
EXACT_BITS = 16.0


def _never(cache_config: CacheConfig | None, chunk_sizes: Sequence[int]) -> None:
    return None  # transformers' DynamicCache: every token exact


@dataclass(frozen=True)
class Method:
    """A named way to build the cache of one sequence (or batch).

    ``config`` is what was asked for, before any model is known: a preset's generic config (a
    ``best-*`` name runs a bundled calibration on the models it fits, and per-token groups are
    fitted to the model's head_dim), or a transformers cache's options under ``"cache"``.
    ``bits_per_element`` is its nominal stored bits per K/V element, exact elements at 16 bits.
    What really ran, and its sizes on the model, is `record`.
    ``quantized_tokens`` counts the tokens a forward through its cache reads quantized
    (`quantized_reads.QuantizedCounter`).
    """

    name: str
    make_cache: Callable[[Any], Any] = field(repr=False)
    config: dict = field(default_factory=dict)
    bits_per_element: float = EXACT_BITS
    quantized_tokens: QuantizedCounter = field(default=_never, repr=False)
    source: str | CacheConfig | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "bits_per_element": self.bits_per_element}

    def check_model(self, model_config: Any) -> None:
        """Refuse (ValueError) a kvsqueeze config this model cannot take, from its transformers config
        alone (before the weights load), resolving ``source`` as `SqueezedCache` does."""
        if self.source is None:  # transformers' caches take any model
            return
        from ..calibration.bundled import bundled_config

        num_layers, num_kv_heads, head_dim = kv_shape(model_config)
        named = bundled_config(self.source, model_config) if isinstance(self.source, str) else None
        config = named or resolve_config(self.source, head_dim=head_dim)
        try:
            config.check_model(num_kv_heads, head_dim, num_layers)
        except ValueError as err:
            raise ValueError(f"method {self.name!r} does not fit this model: {err}") from None

    def record(self, model: Any, cache: Any | None = None) -> dict:
        """The `report.method_record` of this method on ``model``, read from ``cache`` (one this
        method built for ``model``; default: a fresh one): the config the cache holds — a ``best-*``
        name's bundled calibration, head_dim-fitted groups — and its sizes on the model."""
        cache = self.make_cache(model) if cache is None else cache
        config = getattr(cache, "cache_config", None)  # a SqueezedCache's resolved config
        read_path = None if config is None else ("fused" if cache.fused else "reference")
        options = {k: v for k, v in self.config.items() if k != "cache"} if config is None else {}
        return method_record(
            self.name,
            config,
            model.config,
            cache=type(cache).__name__,
            read_path=read_path,
            options=options,
            bits_per_element=self.bits_per_element,
        )


def _exact(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _squeezed(config: CacheConfig | str, fused: bool = False) -> Callable[[Any], Any]:
    # attention-scored token policies are read by the fused attention
    fused = fused or resolve_config(config).needs_attention

    def make(model: Any) -> Any:
        from ..integrations.attention import use_fused_attention
        from ..integrations.cache import SqueezedCache

        if fused:
            use_fused_attention(model)
        return SqueezedCache.from_model(model, config, fused=fused)

    return make


def _fused(name: str) -> Method:
    """``<preset or config.json>@fused``: the same cache, read by the fused attention."""
    base = resolve_method(name.removesuffix(FUSED_SUFFIX))
    if base.config.get("cache") in ("DynamicCache", "QuantizedCache"):
        raise ValueError(f"method: {name!r}: {FUSED_SUFFIX} applies to kvsqueeze presets and configs only")
    config = CacheConfig.from_dict(base.config)
    label = f"{name!r} (the reference path: {name.removesuffix(FUSED_SUFFIX)!r})"
    config.check_read_path("fused", "method", label)  # an explicit @fused is obeyed or refused
    cfg = {**base.config, "attn_implementation": "kvsqueeze"}
    source = (
        base.name if base.name in PRESETS or base.name in TOKEN_PRESETS else config
    )  # names: bundled configs
    return Method(
        base.name + FUSED_SUFFIX,
        _squeezed(source, fused=True),
        cfg,
        base.bits_per_element,
        squeezed_quantized_reads,
        source,
    )


def _baseline(backend: str, bits: int) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        from transformers import QuantizedCache

        return QuantizedCache(
            backend,
            model.config,
            nbits=bits,
            q_group_size=BASELINE_GROUP_SIZE,
            residual_length=BASELINE_RESIDUAL_LENGTH,
        )

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
    if name.endswith(FUSED_SUFFIX):
        return _fused(name)
    if name == "exact":
        return Method("exact", _exact, {"cache": "DynamicCache"})
    if name in PRESETS or name in TOKEN_PRESETS:  # by name: best-* pick a bundled calibration for the model
        config = preset(name)
        return Method(
            name,
            _squeezed(name),
            config.to_dict(),
            config.bits_per_element(),
            squeezed_quantized_reads,
            name,
        )
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
            "q_group_size": BASELINE_GROUP_SIZE,
            "residual_length": BASELINE_RESIDUAL_LENGTH,
        }
        # one 16-bit scale and one 16-bit zero point per group of BASELINE_GROUP_SIZE elements
        return Method(
            name,
            _baseline(backend, bits),
            cfg,
            bits + 32 / BASELINE_GROUP_SIZE,
            baseline_quantized_reads(BASELINE_RESIDUAL_LENGTH),
        )
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"method: config file {name!r} does not exist")
        config = CacheConfig.load(path)
        return Method(
            path.stem,
            _squeezed(config),
            config.to_dict(),
            config.bits_per_element(),
            squeezed_quantized_reads,
            config,
        )
    allowed = [
        "exact",
        *PRESETS,
        *TOKEN_PRESETS,
        "quanto-int2",
        "quanto-int4",
        "hqq-int<bits>",
        "<config>.json",
    ]
    raise ValueError(f"method: {name!r} is unknown; allowed: {[*allowed, '<preset>@fused']}")


def resolve_methods(names: str | list[str]) -> list[Method]:
    """Methods from a comma-separated string or a list, validated before any work starts."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [resolve_method(n) for n in names]


def method_available(method: Method) -> tuple[bool, str]:
    """Whether ``method`` can run here (transformers baselines need their optional package), and why not."""
    if method.config.get("cache") != "QuantizedCache":
        return True, ""
    return baseline_available(method.name)
