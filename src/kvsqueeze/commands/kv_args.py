"""The KV cache options of the CLI: a preset or config file (``--kv``), independent key and value
types (``--kv-keys`` / ``--kv-values``, like llama.cpp's ``-ctk`` / ``-ctv``) and an eviction ratio
(``--evict`` / ``--evict-scorer``), turned into one `CacheConfig` before any model loads.

kvsqueeze generate "Hi" --kv k4v2 --kv-keys int8 --kv-values int4:g32
kvsqueeze bench --kv k4v4 --evict 0.5 --evict-scorer knorm

A spec string is ``TYPE[:g<group>][:token|:channel]`` (`parse_spec`). The base config's sinks,
residual window and blocks are kept; ``--kv-keys`` replaces the key spec everywhere it appears
(per-layer overrides of a calibration included), ``--kv-values`` the value spec; the group size and
axis not given are those of the spec replaced (KIVI's layout when it replaces an exact tensor:
keys per-channel over ``block_size`` tokens, values per-token over 64 channels fitted to the head).
``--evict F`` adds the token policy of the presets ``knorm-50`` / ``h2o-50`` / ``snapkv-50``
(`policies.presses`) with fraction F: the kept tokens stay exact when the base is exact, else
they are packed with its specs (as ``h2o-50-k4v4``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from ..config import PRESETS, TOKEN_PRESETS, CacheConfig, fit_group_size, preset
from ..policies import presses
from ..quant.spec import QuantSpec
from .common import check_made_for

DEFAULT_KV = "k4v2"
# spec type -> (format, bits); None: the tensor stays exact (the model's dtype)
SPEC_TYPES: dict[str, tuple[str, int] | None] = {
    "exact": None,
    "int2": ("int", 2),
    "int3": ("int", 3),
    "int4": ("int", 4),
    "int8": ("int", 8),
    "nf2": ("nf", 2),
    "nf3": ("nf", 3),
    "nf4": ("nf", 4),
    "fp8": ("fp8_e4m3", 8),
    "fp8_e4m3": ("fp8_e4m3", 8),
    "fp8_e5m2": ("fp8_e5m2", 8),
}
AXES = ("token", "channel")
SPEC_FORMS = (
    f"TYPE[:g<group>][:token|:channel] with TYPE one of {', '.join(SPEC_TYPES)} "
    "(e.g. int4, int4:g32, int2:g64:token, exact)"
)
EVICT_SCORERS = {"knorm": presses.knorm, "h2o": presses.h2o, "snapkv": presses.snapkv}
DEFAULT_EVICT_SCORER = "knorm"
TOKEN_VALUES_GROUP = 64  # channels per group of a per-token spec that replaces an exact tensor


def parse_spec(
    text: str,
    flag: str,
    like: QuantSpec | None = None,
    role: str = "key",
    block_size: int = 64,
    head_dim: int | None = None,
) -> QuantSpec | None:
    """The `QuantSpec` of the spec string ``text`` given to ``flag`` (None for ``exact``), e.g.
    ``int4``, ``int4:g32``, ``nf2:g64:token``, ``fp8``.

    The group size and axis not written are those of ``like`` (the spec replaced), else the KIVI
    layout for ``role``: keys per-channel with groups of ``block_size`` tokens, values per-token with
    groups of 64 channels (fitted to ``head_dim`` when given, `fit_group_size`). ValueError naming
    ``flag``, the value and the allowed forms otherwise.
    """

    def refuse(why: str) -> ValueError:
        return ValueError(f"{flag}: {text!r} {why}; allowed: {SPEC_FORMS}")

    if not isinstance(text, str) or not text.strip():
        raise refuse("is empty")
    kind, *options = [part.strip() for part in text.strip().lower().split(":")]
    if kind not in SPEC_TYPES:
        raise refuse(f"has an unknown type {kind!r}")
    group, axis = None, None
    for option in options:
        if option in AXES and axis is None:
            axis = option
        elif option.startswith("g") and option[1:].isdigit() and group is None:
            group = int(option[1:])
            if group < 1:
                raise refuse("has group size 0")
        else:
            raise refuse(f"has an unknown or repeated part {option!r}")
    coding = SPEC_TYPES[kind]
    if coding is None:
        if options:
            raise refuse("gives a group or axis to 'exact', which has none")
        return None
    if axis is None:
        axis = like.axis.value if like is not None else ("channel" if role == "key" else "token")
    if group is None:
        if like is not None and like.axis.value == axis:
            group = like.group_size
        elif axis == "channel":
            group = block_size
        else:
            group = fit_group_size(TOKEN_VALUES_GROUP, head_dim) if head_dim else TOKEN_VALUES_GROUP
    fmt, bits = coding
    try:
        return QuantSpec(bits=bits, format=fmt, axis=axis, group_size=group)
    except ValueError as err:
        raise ValueError(f"{flag}: {text!r}: {err}; allowed: {SPEC_FORMS}") from None


def add_kv_arguments(
    parser: argparse.ArgumentParser, kv_default: str | None = DEFAULT_KV, kv_help: str = ""
) -> None:
    """Add ``--kv``, ``--kv-keys``, ``--kv-values``, ``--evict`` and ``--evict-scorer`` to ``parser``."""
    names = ", ".join([*PRESETS, *TOKEN_PRESETS])
    parser.add_argument(
        "--kv",
        default=kv_default,
        metavar="PRESET|CONFIG.json",
        help=kv_help or f"KV cache preset ({names}) or a config/calibration JSON file (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-keys",
        metavar="SPEC",
        help=f"key cache type replacing the keys of --kv (like llama.cpp -ctk): {SPEC_FORMS}; group and "
        "axis default to those of the keys replaced (default: the keys of --kv)",
    )
    parser.add_argument(
        "--kv-values",
        metavar="SPEC",
        help="value cache type replacing the values of --kv (like llama.cpp -ctv), same forms as --kv-keys "
        "(default: the values of --kv)",
    )
    parser.add_argument(
        "--evict",
        type=float,
        metavar="FRACTION",
        help="evict this fraction, in (0, 1], of the tokens leaving the residual window (the policy of the "
        "*-50 presets with another ratio); kept tokens stay exact when --kv is exact, else packed "
        "(default: no eviction)",
    )
    parser.add_argument(
        "--evict-scorer",
        choices=list(EVICT_SCORERS),
        help=f"which tokens --evict drops: knorm (largest key norms, any read path), h2o (least accumulated "
        f"attention) or snapkv (least attended by the last queries); h2o and snapkv take the fused path "
        f"(default: {DEFAULT_EVICT_SCORER})",
    )


@dataclass(frozen=True)
class ResolvedKV:
    """What runs: ``config``; ``source`` to give `SqueezedCache` (the preset name itself when no flag
    changes it, so that the cache resolves the name as the library always does, else ``config``);
    ``label`` names it in reports (e.g. ``best-3bit (bundled calibration for this model)``)."""

    source: str | CacheConfig
    config: CacheConfig
    label: str


@dataclass(frozen=True)
class KVChoice:
    """What the KV flags ask for: the base ``kv`` (preset name or JSON path) and its changes."""

    kv: str = DEFAULT_KV
    keys: str | None = None
    values: str | None = None
    evict: float | None = None
    evict_scorer: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_kv: str = DEFAULT_KV) -> KVChoice:
        """Raises ValueError for an empty or blank ``--kv`` (it would silently mean the default)."""
        if args.kv is not None and not str(args.kv).strip():
            raise ValueError(f"--kv: {args.kv!r} names no preset or file; give e.g. --kv {default_kv}")
        return cls(args.kv or default_kv, args.kv_keys, args.kv_values, args.evict, args.evict_scorer)

    @property
    def modified(self) -> bool:
        """Whether keys, values or eviction change the base."""
        return self.keys is not None or self.values is not None or self.evict is not None

    @property
    def label(self) -> str:
        """The base and its changes, e.g. ``k4v2+keys=int8+evict=0.5:knorm`` (``k4v2`` unchanged)."""
        parts = [self.kv]
        if self.keys is not None:
            parts.append(f"keys={self.keys}")
        if self.values is not None:
            parts.append(f"values={self.values}")
        if self.evict is not None:
            parts.append(f"evict={self.evict:g}:{self.evict_scorer or DEFAULT_EVICT_SCORER}")
        return "+".join(parts)

    def check(self) -> None:
        """The checks that need no model: the base exists, spec strings parse, the eviction fraction
        and scorer are allowed. ValueError naming the flag, the value and what is allowed."""
        self.base()  # raises when --kv is neither a preset nor a readable config file
        for flag, text, role in (("--kv-keys", self.keys, "key"), ("--kv-values", self.values, "value")):
            if text is not None:
                parse_spec(text, flag, role=role)
        if self.evict_scorer is not None and self.evict is None:
            raise ValueError(
                f"--evict-scorer: {self.evict_scorer!r} given without --evict; add --evict FRACTION, e.g. --evict 0.5"
            )
        if self.evict_scorer is not None and self.evict_scorer not in EVICT_SCORERS:
            raise ValueError(
                f"--evict-scorer: {self.evict_scorer!r} is unknown; allowed: {list(EVICT_SCORERS)}"
            )
        evict = self.evict
        if evict is not None and (
            isinstance(evict, bool) or not isinstance(evict, (int, float)) or not 0 < evict <= 1
        ):
            raise ValueError(
                f"--evict: {self.evict!r} is not allowed; allowed: a fraction in (0, 1], e.g. 0.5"
            )

    def base(self, model_config: Any = None) -> tuple[CacheConfig, bool]:
        """``(config, bundled)``: the config ``--kv`` names, a JSON file or a preset; with ``model_config``
        a preset is fitted to the model's head_dim, and a ``best-*`` preset is its bundled calibration
        when one matches the model (``bundled`` True)."""
        if self.kv.endswith(".json"):
            try:
                return CacheConfig.load(self.kv), False
            except ValueError as err:
                raise ValueError(f"--kv: {err}") from None
            except OSError as err:
                raise ValueError(f"--kv: {self.kv!r} cannot be read ({err.strerror or err})") from None
        try:
            named = preset(self.kv)
        except ValueError as err:
            raise ValueError(f"--kv: {err}") from None
        if model_config is None:
            return named, False
        from ..calibration.bundled import bundled_config

        bundled = bundled_config(self.kv, model_config)
        if bundled is not None:
            return bundled, True
        return named.for_head_dim(_shape(model_config)[1]), False

    def resolve(self, model_config: Any = None, model: str | None = None) -> ResolvedKV:
        """The `CacheConfig` these flags build (for ``model_config``'s model when given, and checked
        against it: a config file calibrated for another model is refused naming --kv, the file and
        both models, ``model`` being the --model value). ValueError naming the flag at fault, its
        value and what is allowed."""
        self.check()
        config, bundled = self.base(model_config)
        if model_config is not None and self.kv.endswith(".json"):
            check_made_for("--kv", self.kv, config, model_config, model)
        shape = _shape(model_config) if model_config is not None else None
        head_dim = shape[1] if shape else None

        def fits(config: CacheConfig, flag: str) -> CacheConfig:  # blame the flag that just changed it
            if shape is not None:
                try:
                    config.check_model(shape[2], shape[1], shape[0])
                except ValueError as err:
                    raise ValueError(f"{flag}: {self.label} does not fit the model: {err}") from None
            return config

        config = fits(config, "--kv")
        if self.keys is not None:
            config = fits(_replace_specs(config, "key", self.keys, "--kv-keys", head_dim), "--kv-keys")
        if self.values is not None:
            config = fits(
                _replace_specs(config, "value", self.values, "--kv-values", head_dim), "--kv-values"
            )
        if self.evict is not None:
            config = fits(self._with_eviction(config), "--evict")
        named = not self.modified and not self.kv.endswith(".json")
        label = self.label + (" (bundled calibration for this model)" if bundled else "")
        return ResolvedKV(self.kv if named else config, config, label)

    def _with_eviction(self, config: CacheConfig) -> CacheConfig:
        scorer = self.evict_scorer or DEFAULT_EVICT_SCORER
        plain = [n for n, c in {**PRESETS, **TOKEN_PRESETS}.items() if _takes_eviction(c)]
        if config.tokens is not None:
            raise ValueError(
                f"--evict: --kv {self.kv} already has a token policy; allowed: a base without one, e.g. {plain}"
            )
        exact = config.key is None and config.value is None and not config.layer_overrides
        policy = EVICT_SCORERS[scorer](self.evict, default="exact" if exact else "low")
        try:
            config = config.replace(tokens=policy)
        except ValueError as err:
            raise ValueError(f"--evict: {self.evict:g} with --kv {self.label}: {err}") from None
        return config


def _takes_eviction(config: CacheConfig) -> bool:
    """Whether a token policy can be added to ``config`` (it has none yet; rotations and pre-RoPE keys
    combine with one)."""
    return config.tokens is None


def _replace_specs(config: CacheConfig, role: str, text: str, flag: str, head_dim: int | None) -> CacheConfig:
    """``config`` with its ``role`` ("key" or "value") spec replaced by ``text`` in every layer."""

    def new(like: QuantSpec | None) -> QuantSpec | None:
        return parse_spec(text, flag, like, role, config.block_size, head_dim)

    overrides = tuple(replace(o, **{role: new(getattr(o, role))}) for o in config.layer_overrides)
    try:
        return config.replace(**{role: new(getattr(config, role))}, layer_overrides=overrides)
    except ValueError as err:
        raise ValueError(f"{flag}: {text!r} with --kv block_size {config.block_size}: {err}") from None


def _shape(model_config: Any) -> tuple[int, int, int]:
    """(num_layers, head_dim, num_kv_heads) of a transformers config."""
    cfg = model_config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, head_dim, heads


def describe(config: CacheConfig) -> str:
    """One line: the key and value specs, transforms, sinks, window and token policy of ``config``."""

    def spec(s: QuantSpec | None) -> str:
        if s is None:
            return "exact"
        name = s.format.value if s.is_fp8 else f"{s.format.value}{s.bits}"
        outliers = f" + {100 * s.outlier_fraction:g}% outliers" if s.has_outliers else ""
        return f"{name} per-{s.axis.value} g{s.group_size}{outliers}"

    parts = [f"keys {spec(config.key)}", f"values {spec(config.value)}"]
    if config.layer_overrides:
        parts.append(f"{len(config.layer_overrides)} layers overridden")
    transforms = {"pre-RoPE keys": config.pre_rope_keys, "rotated keys": config.rotate_keys}
    transforms["rotated values"] = config.rotate_values
    parts += [name for name, on in transforms.items() if on]
    parts.append(f"{config.sink_tokens} sinks, window {config.residual_window}")
    tokens = config.tokens
    if tokens is not None:
        if tokens.evict:
            parts.append(f"evict {tokens.evict:.0%} by {tokens.scorer}")
        if tokens.keep_exact or tokens.layer_keep_exact:
            parts.append(f"most important tokens exact by {tokens.scorer}")
        if tokens.default == "evict":
            parts.append("tokens leaving the window evicted")
    return ", ".join(parts)
