"""The configuration tree: `CacheConfig` (keys spec, values spec, exact tokens, blocks) and presets.

Everything is a frozen dataclass that validates itself, round-trips through plain dicts and
rejects unknown keys. The CLI is a view of this tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .config_file import Fingerprint, as_fingerprint, check_fingerprint, read_config_file
from .policies import presses
from .policies.plan import TokenPolicy
from .quant.exact import ExactSpec
from .quant.spec import Axis, QuantSpec, as_spec, check_bool, check_int, from_fields

__all__ = [
    "PRESETS",
    "READ_PATHS",
    "TOKEN_PRESETS",
    "CacheConfig",
    "LayerOverride",
    "QuantSpec",
    "TokenPolicy",
    "fit_group_size",
    "is_config_path",
    "preset",
    "resolve_config",
]

READ_PATHS = ("reference", "fused")  # dequantize then SDPA; attention on the packed codes


@dataclass(frozen=True)
class LayerOverride:
    """Key and value specs of one layer (index ``layer`` of the model), e.g. from calibration;
    None keeps that tensor exact in this layer."""

    layer: int
    key: QuantSpec | None
    value: QuantSpec | None

    def __post_init__(self) -> None:
        check_int(self.layer, "layer_overrides.layer", 0)
        for name in ("key", "value"):
            object.__setattr__(
                self, name, as_spec(getattr(self, name), f"layer_overrides[{self.layer}].{name}")
            )

    def to_dict(self) -> dict:
        def d(spec: QuantSpec | None) -> dict | None:
            return None if spec is None else spec.to_dict()

        return {"layer": self.layer, "key": d(self.key), "value": d(self.value)}

    @classmethod
    def from_dict(cls, data: dict, label: str = "layer_overrides") -> LayerOverride:
        return from_fields(cls, data, label)


EXACT_DTYPES = ("auto", "model", "float16", "bfloat16", "float32")


def exact_storage_dtype(exact_dtype: str, model_dtype: torch.dtype, quantizes: bool) -> torch.dtype:
    """The dtype exact parts are stored in, for ``CacheConfig.exact_dtype`` and the model's dtype."""
    if exact_dtype == "auto":
        return torch.float16 if quantizes and model_dtype == torch.float32 else model_dtype
    return model_dtype if exact_dtype == "model" else getattr(torch, exact_dtype)


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
        rotate_keys: rotate packed keys per head by a seeded randomized Hadamard matrix before
            quantization (undone on read; attention unchanged up to quantization error).
        rotate_values: the same for packed values.
        pre_rope_keys: quantize keys before the rotary embedding (KVQuant) and re-apply it on read;
            models without standard RoPE fall back to post-RoPE keys with a warning.
        rotation_seed: seed of the rotation matrix.
        layer_overrides: per-layer key/value specs (`LayerOverride`, e.g. from a calibration file);
            layers not listed use ``key`` and ``value``.
        tokens: per-token precision and eviction of the tokens leaving the window
            (`TokenPolicy`: roles, importance, ``keep_exact``, ``evict``); None: every such token
            is packed with ``key``/``value``. Per-layer overrides set the low class of their layer;
            rotations and pre-RoPE keys apply to every packed class (high and low).
        exact_dtype: dtype of the exact parts (sinks, residual window, tokens awaiting a flush):
            ``"auto"`` (default) stores them in float16 when the model computes in float32 and the
            config quantizes something (a 16-bit window costs half of a float32 one; a store whose
            exact values leave the float16 range keeps the model's dtype, with a warning), and in
            the model's dtype otherwise (so ``none`` reproduces DynamicCache exactly); ``"model"``,
            ``"float16"``, ``"bfloat16"`` or ``"float32"`` force it.
        model_fingerprint: the model a calibrated config was made for (`config_file`; written by
            ``kvsqueeze calibrate``), as {field: value} of its transformers config; `check_model`
            with ``model_config`` refuses the config on another model. Empty: any model.

    Every config is read by the fused kernels (`kernel_readable`): codebook and outlier formats,
    rotations and pre-RoPE keys included (docs/kernels.md).
    """

    key: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="channel", group_size=64))
    value: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, axis="token", group_size=64))
    sink_tokens: int = 4
    residual_window: int = 128
    block_size: int = 64
    page_tokens: int = 1024
    rotate_keys: bool = False
    rotate_values: bool = False
    pre_rope_keys: bool = False
    rotation_seed: int = 0
    layer_overrides: tuple[LayerOverride, ...] = ()
    tokens: TokenPolicy | None = None
    exact_dtype: str = "auto"
    model_fingerprint: Fingerprint = ()

    def __post_init__(self) -> None:
        if isinstance(self.tokens, dict):
            object.__setattr__(self, "tokens", TokenPolicy.from_dict(self.tokens))
        elif self.tokens is not None and not isinstance(self.tokens, TokenPolicy):
            raise ValueError(f"tokens: {self.tokens!r} must be a TokenPolicy, a dict of its fields, or None")
        for name in ("key", "value"):
            object.__setattr__(self, name, as_spec(getattr(self, name), name))
        for name in ("sink_tokens", "residual_window"):
            check_int(getattr(self, name), name, 0)
        check_int(self.block_size, "block_size", 1)
        if self.residual_window % self.block_size:
            raise ValueError(
                f"residual_window: {self.residual_window} is not a multiple of block_size {self.block_size}; "
                f"allowed: 0, {self.block_size}, {2 * self.block_size}, ..."
            )
        if (
            isinstance(self.page_tokens, bool)
            or not isinstance(self.page_tokens, int)
            or self.page_tokens < 1
            or self.page_tokens % self.block_size
        ):
            raise ValueError(
                f"page_tokens: {self.page_tokens!r} must be a positive multiple of block_size {self.block_size}"
            )
        for name in ("rotate_keys", "rotate_values", "pre_rope_keys"):
            check_bool(getattr(self, name), name)
        if (
            isinstance(self.rotation_seed, bool)
            or not isinstance(self.rotation_seed, int)
            or not (0 <= self.rotation_seed < 2**64)
        ):
            raise ValueError(f"rotation_seed: {self.rotation_seed!r} must be an integer in [0, 2**64)")
        if self.exact_dtype not in EXACT_DTYPES:
            raise ValueError(f"exact_dtype: {self.exact_dtype!r} is unknown; allowed: {list(EXACT_DTYPES)}")
        object.__setattr__(self, "layer_overrides", _overrides(self.layer_overrides))
        object.__setattr__(self, "model_fingerprint", as_fingerprint(self.model_fingerprint))
        layers = [o.layer for o in self.layer_overrides]
        if len(set(layers)) != len(layers):
            raise ValueError(f"layer_overrides: layers {layers} repeat; each layer may appear once")
        for name, spec in self.named_specs():
            spec.check_block_size(self.block_size, field=f"{name}.group_size")

    def named_specs(self) -> list[tuple[str, QuantSpec]]:
        """(field name, spec) of every spec in the tree, e.g. ``("value", ...)``, ``("tokens.high_key", ...)``."""
        named = [(n, getattr(self, n)) for n in ("key", "value") if getattr(self, n) is not None]
        for o in self.layer_overrides:
            for name in ("key", "value"):
                if getattr(o, name) is not None:
                    named.append((f"layer_overrides[{o.layer}].{name}", getattr(o, name)))
        if self.tokens is not None:
            for name in ("high_key", "high_value"):
                if getattr(self.tokens, name) is not None:
                    named.append((f"tokens.{name}", getattr(self.tokens, name)))
        return named

    @property
    def is_exact(self) -> bool:
        return self.key is None and self.value is None and not self.layer_overrides

    @property
    def needs_attention(self) -> bool:
        """Whether the token policy scores tokens by attention (fused read path only)."""
        return self.tokens is not None and self.tokens.needs_attention

    @property
    def kernel_readable(self) -> bool:
        """Whether the native fused kernels can read this cache: every format (integer, FP8, codebook,
        outliers) and transform (rotations, pre-RoPE keys) since issue 16."""
        return True

    @property
    def read_paths(self) -> tuple[str, ...]:
        """The read paths that can run this config: ``"reference"`` (dequantize, then SDPA) unless its
        token policy scores tokens by attention, ``"fused"`` when the native kernels can read it."""
        ok = {"reference": not self.needs_attention, "fused": self.kernel_readable}
        return tuple(path for path in READ_PATHS if ok[path])

    def check_read_path(self, path: str, field: str, label: str) -> None:
        """Raise ValueError naming ``field``, ``path``, the config ``label``, why, and the allowed
        paths when the read path ``path`` cannot run this config."""
        if path not in READ_PATHS:
            raise ValueError(f"{field}: {path!r} is unknown; allowed: {list(READ_PATHS)}")
        if path in self.read_paths:
            return
        why = {
            "fused": "the native fused kernels cannot read codebook or outlier formats, rotations or "
            "pre-RoPE keys",
            "reference": "its token policy scores tokens by attention, which only the fused path sees",
        }[path]
        paths = self.read_paths
        allowed = (
            str(list(paths)) if paths else "none (it needs the fused path, which cannot read its formats)"
        )
        raise ValueError(f"{field}: {path!r} cannot run {label}: {why}; allowed for it: {allowed}")

    def for_layer(self, layer: int) -> CacheConfig:
        """The config of model layer ``layer`` (its override applied, no overrides left)."""
        out = self
        if self.tokens is not None and self.tokens.layer_keep_exact:
            out = replace(out, tokens=self.tokens.for_layer(layer))
        for o in self.layer_overrides:
            if o.layer == layer:
                return replace(out, key=o.key, value=o.value, layer_overrides=())
        return replace(out, layer_overrides=()) if self.layer_overrides else out

    def for_head_dim(self, head_dim: int) -> CacheConfig:
        """This config with every per-token group size that does not divide ``head_dim`` lowered to
        `fit_group_size`; per-channel groups (along tokens) are kept. What a preset *name* becomes
        on a model (`resolve_config`); ``self`` when nothing changes."""
        check_int(head_dim, "head_dim", 1)

        def fit(spec: QuantSpec | None) -> QuantSpec | None:
            if spec is None or spec.axis is not Axis.TOKEN or head_dim % spec.group_size == 0:
                return spec
            return replace(spec, group_size=fit_group_size(spec.group_size, head_dim))

        tokens = self.tokens
        if tokens is not None:
            tokens = replace(tokens, high_key=fit(tokens.high_key), high_value=fit(tokens.high_value))
        overrides = tuple(replace(o, key=fit(o.key), value=fit(o.value)) for o in self.layer_overrides)
        out = replace(
            self, key=fit(self.key), value=fit(self.value), layer_overrides=overrides, tokens=tokens
        )
        return self if out == self else out

    def check_model(
        self, num_kv_heads: int, head_dim: int, num_layers: int | None = None, model_config: Any = None
    ) -> None:
        """Raise if the specs cannot tile this model's heads, overrides name missing layers, or (with
        the model's transformers ``model_config``) the config was calibrated for another model
        (`model_fingerprint`)."""
        check_int(num_kv_heads, "num_kv_heads", 1)
        check_int(head_dim, "head_dim", 1)
        if num_layers is not None:
            check_int(num_layers, "num_layers", 1)
        if model_config is not None:
            check_fingerprint(self.model_fingerprint, model_config)
        for name, spec in self.named_specs():
            spec.check_head_dim(head_dim, field=f"{name}.group_size")
        if num_layers is not None:
            if self.tokens is not None:
                extra = [layer for layer, _ in self.tokens.layer_keep_exact if layer >= num_layers]
                if extra:
                    raise ValueError(
                        f"tokens.layer_keep_exact: layers {extra} do not exist; allowed: 0 .. {num_layers - 1}"
                    )
            beyond = [o.layer for o in self.layer_overrides if o.layer >= num_layers]
            if beyond:
                raise ValueError(
                    f"layer_overrides: layers {beyond} do not exist; allowed: 0 .. {num_layers - 1}"
                )

    def _layers(self, num_layers: int | None) -> list[CacheConfig]:
        if num_layers is None:
            num_layers = max((o.layer for o in self.layer_overrides), default=0) + 1
        check_int(num_layers, "num_layers", 1)
        return [self.for_layer(i) for i in range(num_layers)]

    def bits_per_element(self, exact_bits: int = 16, num_layers: int | None = None) -> float:
        """Average stored bits per K/V element of the packed history (exact parts count ``exact_bits``),
        averaged over layers when there are per-layer overrides (``num_layers`` default: up to the
        last overridden layer). Outliers count at their nominal fraction."""
        if self.layer_overrides:
            per_layer = [c.bits_per_element(exact_bits) for c in self._layers(num_layers)]
            return sum(per_layer) / len(per_layer)
        k = self.key.bits_per_element if self.key else exact_bits
        v = self.value.bits_per_element if self.value else exact_bits
        return (k + v) / 2

    def bytes_per_token(
        self, num_layers: int, num_kv_heads: int, head_dim: int, exact_bytes: int | ExactSpec = 2
    ) -> float:
        """Bytes per token of packed history over all layers (keys + values, scales and outlier side
        store included).

        Exact tensors (spec None) count as ``exact_bytes``: an `ExactSpec`, or its bytes per element. Sinks and the residual window
        add a fixed amount per sequence on top; `SqueezedCache.nbytes` counts everything held.
        """
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            check_int(value, name, 1)
        if self.layer_overrides:
            return sum(
                c.bytes_per_token(1, num_kv_heads, head_dim, exact_bytes) for c in self._layers(num_layers)
            )
        exact = exact_bytes if isinstance(exact_bytes, ExactSpec) else ExactSpec.for_itemsize(exact_bytes)
        total = sum(
            (spec or exact).bytes_per_token(num_kv_heads, head_dim) for spec in (self.key, self.value)
        )
        return num_layers * total

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("key", "value", "tokens"):
            out[name] = None if out[name] is None else out[name].to_dict()
        out["layer_overrides"] = [o.to_dict() for o in self.layer_overrides]
        if out["tokens"] is None:
            del out["tokens"]  # configs without a token policy keep their old dict form
        if self.exact_dtype == "auto":
            del out["exact_dtype"]  # the default keeps the old dict form
        if self.model_fingerprint:
            out["model_fingerprint"] = dict(self.model_fingerprint)
        else:
            del out["model_fingerprint"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CacheConfig:
        if isinstance(data, str):
            raise ValueError(
                f"CacheConfig: expected a dict (JSON object) of its fields, got str {data!r}; a preset name "
                "or a config file path goes to resolve_config() (or preset() for names)"
            )
        return from_fields(cls, data, "CacheConfig")

    @classmethod
    def load(cls, path: str | Path) -> CacheConfig:
        """A config from a JSON file: a plain `to_dict` dump, or a file holding one under ``"config"``
        such as a calibration file written by ``kvsqueeze calibrate`` (whose model fingerprint the
        config keeps; the statistics beside it are ignored). ValueError naming the file otherwise."""
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"config file {str(path)!r}: {err}") from None

    def replace(self, **changes: object) -> CacheConfig:
        allowed = [f.name for f in fields(self)]
        unknown = [name for name in changes if name not in allowed]
        if unknown:
            raise ValueError(f"CacheConfig: unknown fields {unknown}; allowed: {allowed}")
        return replace(self, **changes)


def _overrides(value: object) -> tuple[LayerOverride, ...]:
    """``layer_overrides`` as a tuple of `LayerOverride` (given ones or dicts of their fields)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"layer_overrides: {value!r:.80} must be a list of LayerOverride or dicts "
            "{'layer': ..., 'key': ..., 'value': ...}"
        )
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = LayerOverride.from_dict(item, f"layer_overrides[{i}]")
        if not isinstance(item, LayerOverride):
            raise ValueError(
                f"layer_overrides[{i}]: {item!r:.80} must be a LayerOverride or a dict of its fields "
                "{'layer': ..., 'key': ..., 'value': ...}"
            )
        out.append(item)
    return tuple(out)


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
    "k4v4": _kivi(4, 4, 64, residual_window=64),  # 64: at 2k below quanto int4 at equal ΔPPL (issue 13)
    "k4v2": CacheConfig(
        key=QuantSpec(bits=4, axis="channel", group_size=64),
        value=QuantSpec(bits=2, axis="token", group_size=32),
    ),
    "k2v2": _kivi(2, 2, 32),
    # The most accurate configurations measured within 4.6 / 3.6 / 2.8 bits per element
    # (benchmarks/low_bit.py; README "Low-bit presets"). Read by both paths.
    "best-4bit": CacheConfig(
        key=QuantSpec(bits=4, axis="channel", group_size=64),
        value=QuantSpec(bits=4, axis="token", group_size=64),
        pre_rope_keys=True,
    ),
    "best-3bit": CacheConfig(
        key=QuantSpec(bits=4, axis="channel", group_size=128),
        value=QuantSpec(bits=2, axis="token", group_size=64, format="nf", outlier_fraction=0.01),
        block_size=128,
        pre_rope_keys=True,
        rotate_values=True,
    ),
    "best-2bit": CacheConfig(
        key=QuantSpec(bits=3, axis="channel", group_size=128, outlier_fraction=0.0025),
        value=QuantSpec(bits=2, axis="token", group_size=64, format="nf", symmetric=True),
        block_size=128,
        pre_rope_keys=True,
        rotate_values=True,
    ),
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
    "k2v2-instruct-snap3": _tokens(
        _K2V2.replace(value=QuantSpec(bits=2, axis="token", group_size=64)),
        TokenPolicy(
            roles={"instruction": "exact"},
            scorer="attention",
            pool_size=7,
            keep_exact=0.03,
            exact_dtype="float16",
        ),
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
    "h2o-50-k4v4": _tokens(_kivi(4, 4, 64, residual_window=64), presses.h2o(0.5, default="low")),  # k4v4's
}

PRESET_NOTES: dict[str, str] = {
    "none": "exact passthrough (reproduces DynamicCache)",
    "int8": "8-bit keys per-channel, values per-token, group 64",
    "fp8": "FP8 e4m3 with fp16 group scales (group 64)",
    "k4v4": "4-bit KIVI: keys per-channel, values per-token, group 64",
    "k4v2": "4-bit keys per-channel (g64), 2-bit values per-token (g32)",
    "k2v2": "2-bit KIVI-2: group 32, residual 128",
    "best-4bit": "most accurate <= 4.6 b/el: pre-RoPE int4 keys (g64), int4 values (g64)",
    "best-3bit": "most accurate <= 3.6 b/el: pre-RoPE int4 keys (g128), rotated NF2 values + 1% outliers",
    "best-2bit": "most accurate <= 2.8 b/el: pre-RoPE int3 keys (g128) + 0.25% outliers, rotated NF2 values",
    "text-centric": "k2v2 for image/video/audio tokens, text and instructions exact (needs set_roles)",
    "k2v2-instruct": "k2v2, caller-marked instruction spans exact (fp16), window 32",
    "k2v2-instruct-snap3": "k2v2-instruct (values g64) + the 3 % of tokens the prompt's last 32 queries attend to most exact; fused path",
    "k2v2-keep10": "k2v2 + 10 % of the tokens exact (fp16), ranked by attention; per-layer budgets from "
    "calibration (bundled for the embedded model, else 10 % in every layer); fused path",
    "k2v2-keep10-knorm": "k2v2, the 10 % lowest-key-norm tokens exact (fp16)",
    "k2v2-keep10-krange": "k2v2, the 10 % tokens stretching the key ranges most exact (fp16)",
    "streaming-1k": "StreamingLLM: 4 sinks + 1024 recent tokens, the rest evicted",
    "h2o-50": "H2O: half of the tokens leaving the window evicted by attention; fused path",
    "snapkv-50": "SnapKV: half evicted by pooled observation-window attention; fused path",
    "knorm-50": "half evicted by key norm",
    "h2o-50-k4v4": "H2O half evicted, the kept tokens k4v4; fused path",
}


def fit_group_size(group_size: int, head_dim: int) -> int:
    """The per-token group size a preset's nominal ``group_size`` takes on heads of ``head_dim``
    channels: the largest divisor of ``head_dim`` not above ``group_size`` (see `preset`)."""
    return max(d for d in range(1, min(group_size, head_dim) + 1) if head_dim % d == 0)


def preset(name: str) -> CacheConfig:
    """The named preset (`PRESETS` or `TOKEN_PRESETS`); ValueError listing the allowed names otherwise.

    The catalogue is written for head_dim 64 and 128 (its per-token groups are 32 or 64 channels).
    On another model a preset *name* is fitted to its head_dim (`resolve_config` with ``head_dim``,
    as `SqueezedCache` does): every per-token group that does not divide head_dim becomes the
    largest divisor of head_dim below it (`fit_group_size`), so groups are never coarser than the
    nominal ones (accuracy at least nominal) and cost the fewest extra scale bits: group 64 -> 40 /
    48 / 56 and group 32 -> 20 / 32 / 28 for head_dim 80 / 96 / 112 (int4 g64 4.50 -> 4.80 / 4.67 /
    4.57 bits per element); head_dim 64, 128 and 256 keep every group. Nothing else constrains the
    choice: codes are bit-packed along the whole head (3-bit needs head_dim a multiple of 8, not
    of the group), rotations act on the whole head (randomized Hadamard for power-of-two head_dim,
    a seeded orthogonal matrix otherwise), the generic native kernel reads any group dividing
    head_dim and the fast one only head_dim 64 / 128, where groups are kept. Per-channel key
    groups run along tokens (they divide ``block_size``) and are never changed.
    """
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    if isinstance(name, str) and name in TOKEN_PRESETS:
        return TOKEN_PRESETS[name]
    raise ValueError(
        f"preset: {name!r} is unknown; allowed: {[*PRESETS, *TOKEN_PRESETS]} "
        "(where a preset is accepted, so is a config file: a path ending in .json)"
    )


def is_config_path(config: object) -> bool:
    """Whether ``config`` names a config file rather than a preset: a path object, or a string
    that is not a preset name and ends in ``.json``, contains a path separator or names a file."""
    if isinstance(config, os.PathLike):
        return True
    if not isinstance(config, str) or config in PRESETS or config in TOKEN_PRESETS:
        return False
    return config.endswith(".json") or "/" in config or os.sep in config or Path(config).is_file()


def resolve_config(config: str | Path | CacheConfig | dict, head_dim: int | None = None) -> CacheConfig:
    """A `CacheConfig` from a preset name, a config file (`is_config_path`: `CacheConfig.load`,
    calibration files included), a dict of fields, or a `CacheConfig`.

    With ``head_dim`` (the model's), a preset name is fitted to it (`preset`,
    `CacheConfig.for_head_dim`); a file, dict or `CacheConfig` is the user's explicit choice and is
    returned unchanged (`CacheConfig.check_model` rejects groups that do not divide head_dim).
    """
    if head_dim is not None:
        check_int(head_dim, "head_dim", 1)
    if isinstance(config, CacheConfig):
        return config
    if is_config_path(config):
        return CacheConfig.load(config)
    if isinstance(config, str):
        if config not in PRESETS and config not in TOKEN_PRESETS:
            raise ValueError(
                f"config: {config!r} is neither a preset nor a config file; allowed: the presets "
                f"{[*PRESETS, *TOKEN_PRESETS]} or the path of a .json config file (CacheConfig.to_dict "
                "or kvsqueeze calibrate output)"
            )
        named = preset(config)
        return named if head_dim is None else named.for_head_dim(head_dim)
    if isinstance(config, dict):
        return CacheConfig.from_dict(config)
    raise ValueError(
        f"config: {config!r:.80} must be a preset name {[*PRESETS, *TOKEN_PRESETS]}, a .json config file "
        "path, a dict or a CacheConfig"
    )
