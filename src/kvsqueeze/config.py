"""The configuration tree: `CacheConfig` (keys spec, values spec, exact tokens, blocks) and presets.

Everything is a frozen dataclass that validates itself, round-trips through plain dicts and
rejects unknown keys. The CLI is a view of this tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .quant.spec import QuantSpec

__all__ = ["PRESETS", "CacheConfig", "QuantSpec", "preset", "resolve_config"]


@dataclass(frozen=True)
class CacheConfig:
    """How a `SqueezedCache` stores keys and values.

    Each layer keeps the first ``sink_tokens`` tokens exact, the most recent tokens exact in a
    residual window, and packs everything in between in blocks of ``block_size`` tokens, each
    quantized exactly once when it leaves the window. The window holds at most
    ``residual_window`` tokens after every update, and at least ``residual_window - block_size + 1``
    once history exists (whole blocks leave it at once).

    Args:
        key: spec of the packed keys; None keeps keys exact (stored in the model's dtype).
        value: spec of the packed values; None keeps values exact.
        sink_tokens: first tokens kept exact (attention sinks); 0 allowed.
        residual_window: recent tokens kept exact; a multiple of ``block_size`` (0 allowed).
        block_size: tokens quantized together; per-channel groups must divide it.
        page_tokens: tokens per preallocated storage page (a multiple of ``block_size``);
            storage grows one page at a time.
    """

    key: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="channel", group_size=64))
    value: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="token", group_size=64))
    sink_tokens: int = 4
    residual_window: int = 128
    block_size: int = 64
    page_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("key", "value"):
            spec = getattr(self, name)
            if isinstance(spec, dict):
                object.__setattr__(self, name, QuantSpec.from_dict(spec))
            elif spec is not None and not isinstance(spec, QuantSpec):
                raise ValueError(
                    f"{name}: {spec!r} must be a QuantSpec, a dict of its fields, or None (exact)"
                )
        for name in ("sink_tokens", "residual_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {value!r} must be an integer >= 0")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: {self.block_size!r} must be a positive integer")
        if self.residual_window % self.block_size:
            raise ValueError(
                f"residual_window: {self.residual_window} is not a multiple of block_size {self.block_size}; "
                f"allowed: 0, {self.block_size}, {2 * self.block_size}, ..."
            )
        if (
            not isinstance(self.page_tokens, int)
            or self.page_tokens < 1
            or self.page_tokens % self.block_size
        ):
            raise ValueError(
                f"page_tokens: {self.page_tokens!r} must be a positive multiple of block_size {self.block_size}"
            )
        for name in ("key", "value"):
            spec = getattr(self, name)
            if spec is not None:
                spec.check_block_size(self.block_size, field=f"{name}.group_size")

    @property
    def is_exact(self) -> bool:
        return self.key is None and self.value is None

    def check_model(self, num_kv_heads: int, head_dim: int) -> None:
        """Raise if the specs cannot tile this model's heads."""
        for name in ("key", "value"):
            spec = getattr(self, name)
            if spec is not None:
                spec.check_head_dim(head_dim, field=f"{name}.group_size")

    def bits_per_element(self, exact_bits: int = 16) -> float:
        """Average stored bits per K/V element of the packed history (exact parts count ``exact_bits``)."""
        k = self.key.bits_per_element if self.key else exact_bits
        v = self.value.bits_per_element if self.value else exact_bits
        return (k + v) / 2

    def bytes_per_token(
        self, num_layers: int, num_kv_heads: int, head_dim: int, exact_bytes: int = 2
    ) -> float:
        """Bytes per token of packed history over all layers (keys + values, scales included).

        Exact tensors (spec None) count ``exact_bytes`` per element. Sinks and the residual window
        add a fixed amount per sequence on top; `SqueezedCache.nbytes` counts everything held.
        """
        per_elem = num_kv_heads * head_dim
        total = 0.0
        for spec in (self.key, self.value):
            total += spec.bytes_per_token(num_kv_heads, head_dim) if spec else per_elem * exact_bytes
        return num_layers * total

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("key", "value"):
            out[name] = None if out[name] is None else out[name].to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CacheConfig:
        allowed = [f.name for f in fields(cls)]
        unknown = set(data) - set(allowed)
        if unknown:
            raise ValueError(f"CacheConfig: unknown keys {sorted(unknown)}; allowed: {allowed}")
        return cls(**data)

    def replace(self, **changes: object) -> CacheConfig:
        return replace(self, **changes)


def _kivi(key_bits: int, value_bits: int, group_size: int, **kw: object) -> CacheConfig:
    return CacheConfig(
        key=QuantSpec(bits=key_bits, axis="channel", group_size=group_size),
        value=QuantSpec(bits=value_bits, axis="token", group_size=group_size),
        block_size=group_size,
        **kw,
    )


PRESETS: dict[str, CacheConfig] = {
    "none": CacheConfig(key=None, value=None, sink_tokens=0, residual_window=0),
    "int8": _kivi(8, 8, 64),
    "fp8": CacheConfig(
        key=QuantSpec(bits=8, format="fp8_e4m3", axis="channel", group_size=64),
        value=QuantSpec(bits=8, format="fp8_e4m3", axis="token", group_size=64),
    ),
    "k4v4": _kivi(4, 4, 64),
    "k4v2": CacheConfig(
        key=QuantSpec(bits=4, axis="channel", group_size=64),
        value=QuantSpec(bits=2, axis="token", group_size=32),
    ),
    "k2v2": _kivi(2, 2, 32),
}

PRESET_NOTES: dict[str, str] = {
    "none": "exact passthrough (reproduces DynamicCache)",
    "int8": "8-bit keys per-channel, values per-token, group 64",
    "fp8": "FP8 e4m3 with fp16 group scales (group 64)",
    "k4v4": "4-bit KIVI: keys per-channel, values per-token, group 64",
    "k4v2": "4-bit keys per-channel (g64), 2-bit values per-token (g32)",
    "k2v2": "2-bit KIVI-2: group 32, residual 128",
}


def preset(name: str) -> CacheConfig:
    """The named preset; ValueError listing the allowed names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is unknown; allowed: {list(PRESETS)}")
    return PRESETS[name]


def resolve_config(config: str | CacheConfig | dict) -> CacheConfig:
    """A `CacheConfig` from a preset name, a dict of fields, or a `CacheConfig`."""
    if isinstance(config, CacheConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return CacheConfig.from_dict(config)
    raise ValueError(f"config: {config!r} must be a preset name {list(PRESETS)}, a dict or a CacheConfig")
