"""The configuration tree: `CacheConfig` (keys spec, values spec, exact tokens, blocks) and presets.

Everything is a frozen dataclass that validates itself, round-trips through plain dicts and
rejects unknown keys. The CLI is a view of this tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .policies import presses
from .policies.plan import TokenPolicy
from .quant.spec import QuantSpec

__all__ = ["PRESETS", "TOKEN_PRESETS", "CacheConfig", "QuantSpec", "TokenPolicy", "preset", "resolve_config"]


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
        tokens: per-token precision and eviction of the tokens leaving the window
            (`TokenPolicy`: roles, importance, ``keep_exact``, ``evict``); None: every such token
            is packed with ``key``/``value``.
    """

    key: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="channel", group_size=64))
    value: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="token", group_size=64))
    sink_tokens: int = 4
    residual_window: int = 128
    block_size: int = 64
    page_tokens: int = 1024
    tokens: TokenPolicy | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokens, dict):
            object.__setattr__(self, "tokens", TokenPolicy.from_dict(self.tokens))
        elif self.tokens is not None and not isinstance(self.tokens, TokenPolicy):
            raise ValueError(f"tokens: {self.tokens!r} must be a TokenPolicy, a dict of its fields, or None")
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
        specs = {"key": self.key, "value": self.value}
        if self.tokens is not None:
            specs.update(
                {"tokens.high_key": self.tokens.high_key, "tokens.high_value": self.tokens.high_value}
            )
        for name, spec in specs.items():
            if spec is not None:
                spec.check_block_size(self.block_size, field=f"{name}.group_size")

    @property
    def is_exact(self) -> bool:
        return self.key is None and self.value is None

    @property
    def needs_attention(self) -> bool:
        """Whether the token policy scores tokens by attention (fused read path only)."""
        return self.tokens is not None and self.tokens.needs_attention

    def check_model(self, num_kv_heads: int, head_dim: int) -> None:
        """Raise if the specs cannot tile this model's heads."""
        specs = {"key": self.key, "value": self.value}
        if self.tokens is not None:
            specs.update(
                {"tokens.high_key": self.tokens.high_key, "tokens.high_value": self.tokens.high_value}
            )
        for name, spec in specs.items():
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
        for name in ("key", "value", "tokens"):
            out[name] = None if out[name] is None else out[name].to_dict()
        if out["tokens"] is None:
            del out["tokens"]  # configs without a token policy keep their old dict form
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


def _tokens(base: CacheConfig, policy: TokenPolicy, **kw: object) -> CacheConfig:
    """``base`` with a token policy (and other `CacheConfig` changes ``kw``)."""
    return base.replace(tokens=policy, **kw)


_K2V2 = _kivi(2, 2, 32)
_EXACT = CacheConfig(key=None, value=None)  # eviction alone: the kept tokens stay exact
_TEXT_CENTRIC = {"text": "exact", "instruction": "exact", "image": "low", "video": "low", "audio": "low"}
TOKEN_PRESETS: dict[str, CacheConfig] = {
    # token-role mixed precision (give the cache its roles: SqueezedCache.set_roles)
    "text-centric": _tokens(_K2V2, TokenPolicy(roles=_TEXT_CENTRIC)),
    "k2v2-instruct": _tokens(
        _K2V2,
        TokenPolicy(roles={"instruction": "exact"}, exact_dtype="float16"),
        residual_window=32,
        page_tokens=64,
    ),
    # importance mixed precision
    "k2v2-keep10": _tokens(_K2V2, TokenPolicy(scorer="attention", keep_exact=0.10, exact_dtype="float16")),
    "k2v2-keep10-knorm": _tokens(_K2V2, TokenPolicy(scorer="knorm", keep_exact=0.10, exact_dtype="float16")),
    "k2v2-keep10-krange": _tokens(
        _K2V2, TokenPolicy(scorer="krange", keep_exact=0.10, exact_dtype="float16")
    ),
    # eviction alone
    "streaming-1k": _tokens(_EXACT, presses.streaming(), residual_window=1024),
    "h2o-50": _tokens(_EXACT, presses.h2o(0.5)),
    "snapkv-50": _tokens(_EXACT, presses.snapkv(0.5)),
    "knorm-50": _tokens(_EXACT, presses.knorm(0.5)),
    # eviction + quantization
    "h2o-50-k4v4": _tokens(_kivi(4, 4, 64), presses.h2o(0.5, default="low")),
}

PRESET_NOTES: dict[str, str] = {
    "none": "exact passthrough (reproduces DynamicCache)",
    "int8": "8-bit keys per-channel, values per-token, group 64",
    "fp8": "FP8 e4m3 with fp16 group scales (group 64)",
    "k4v4": "4-bit KIVI: keys per-channel, values per-token, group 64",
    "k4v2": "4-bit keys per-channel (g64), 2-bit values per-token (g32)",
    "k2v2": "2-bit KIVI-2: group 32, residual 128",
    "text-centric": "k2v2 for image/video/audio tokens, text and instructions exact (needs set_roles)",
    "k2v2-instruct": "k2v2, caller-marked instruction spans exact (fp16), window 32",
    "k2v2-keep10": "k2v2, the 10 % most attended tokens exact (fp16); fused path",
    "k2v2-keep10-knorm": "k2v2, the 10 % lowest-key-norm tokens exact (fp16)",
    "k2v2-keep10-krange": "k2v2, the 10 % tokens stretching the key ranges most exact (fp16)",
    "streaming-1k": "StreamingLLM: 4 sinks + 1024 recent tokens, the rest evicted",
    "h2o-50": "H2O: half of the tokens leaving the window evicted by attention; fused path",
    "snapkv-50": "SnapKV: half evicted by pooled observation-window attention; fused path",
    "knorm-50": "half evicted by key norm",
    "h2o-50-k4v4": "H2O half evicted, the kept tokens k4v4; fused path",
}


def preset(name: str) -> CacheConfig:
    """The named preset (`PRESETS` or `TOKEN_PRESETS`); ValueError listing the allowed names otherwise."""
    if name in PRESETS:
        return PRESETS[name]
    if name in TOKEN_PRESETS:
        return TOKEN_PRESETS[name]
    raise ValueError(f"preset: {name!r} is unknown; allowed: {[*PRESETS, *TOKEN_PRESETS]}")


def resolve_config(config: str | CacheConfig | dict) -> CacheConfig:
    """A `CacheConfig` from a preset name, a dict of fields, or a `CacheConfig`."""
    if isinstance(config, CacheConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return CacheConfig.from_dict(config)
    raise ValueError(
        f"config: {config!r} must be a preset name {[*PRESETS, *TOKEN_PRESETS]}, a dict or a CacheConfig"
    )
