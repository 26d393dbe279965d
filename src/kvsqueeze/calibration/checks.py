"""What a calibration checks before any forward: its sizes, widths and target, the model it runs on,
and an earlier calibration to reuse. `calibrate` runs these on its arguments; ``kvsqueeze
calibrate`` runs them on its flags (``name`` is the flag) before it loads the model.

Every check raises ValueError naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import CacheConfig
from ..integrations.rope import rope_for
from .allocation import Sensitivity, with_bits

NUM_TOKENS = 1024
PREFILL_TOKENS = 256
SCORE_TOKENS = 64
BITS_MENU = (2, 3, 4)
BITS_CHOICES = (2, 3, 4, 8)
BITS_ALLOWED = f"allowed: comma-separated bits from {{{','.join(map(str, BITS_CHOICES))}}}"
REUSE_ALLOWED = "allowed: a bit-allocation calibration file of this model written by kvsqueeze calibrate"

Codebooks = dict[str, dict[int, dict[int, tuple[float, ...]]]]  # kind -> layer -> bits -> levels


def model_fingerprint(model_config: Any) -> dict:
    """The model a calibration file was made for (the file's ``"model"`` entry): the fields of the
    text config that fix the shape of its per-layer config, read from
    ``model_config.get_text_config(decoder=True)``: ``model_type``, ``num_hidden_layers``,
    ``num_key_value_heads`` (``num_attention_heads`` when absent) and ``head_dim`` (``hidden_size //
    num_attention_heads`` when absent)."""
    text = model_config.get_text_config(decoder=True)
    return {
        "model_type": text.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
    }


def check_positive(value: int, name: str) -> None:
    """Raise unless ``value`` is a positive integer (a number of tokens)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r}; allowed: a positive integer (a number of tokens)")


def check_sizes(
    num_tokens: int, prefill_tokens: int, score_tokens: int, base: CacheConfig,
    names: tuple[str, str, str] = ("num_tokens", "prefill_tokens", "score_tokens"),
) -> None:  # fmt: skip
    """Raise unless every size is a positive integer, ``prefill_tokens`` is a multiple of ``base``'s
    ``block_size`` (a probe quantizes all of its prefill, and packs whole blocks only: a shorter one
    would measure nothing) and one probe (sinks + ``prefill_tokens + score_tokens``) fits the slice."""
    tokens, prefill, score = names
    for name, value in zip(names, (num_tokens, prefill_tokens, score_tokens), strict=True):
        check_positive(value, name)
    block = base.block_size
    if prefill_tokens % block:
        below = prefill_tokens // block * block
        raise ValueError(
            f"{prefill}: {prefill_tokens} is not a multiple of the preset's block_size {block} (a probe quantizes "
            f"its whole prefill, in blocks); allowed: {block}, {2 * block}, ..., e.g. "
            + (f"{below} or " if below else "")
            + f"{below + block}"
        )
    needed = base.sink_tokens + prefill_tokens + score_tokens
    if needed > num_tokens:
        fits = (num_tokens - base.sink_tokens - score_tokens) // block * block
        raise ValueError(
            f"{prefill}: {prefill_tokens} with {score} {score_tokens} and the preset's {base.sink_tokens} sink "
            f"tokens makes a {needed}-token probe, longer than the calibration slice ({tokens} {num_tokens}); "
            f"allowed: {base.sink_tokens} + {prefill} + {score} <= {tokens}, e.g. "
            + (f"{prefill} {fits} or " if fits >= 1 else "")
            + f"{tokens} {needed}"
        )


def check_bits_menu(
    bits_menu: tuple[int, ...], base: CacheConfig | None = None, head_dim: int | None = None,
    name: str = "bits_menu",
) -> None:  # fmt: skip
    """Raise unless ``bits_menu`` is a non-empty tuple of `BITS_CHOICES` (and, with ``base``, every
    width applies to its key and value formats; with ``head_dim``, packs a head of that many channels)."""
    if not bits_menu:
        raise ValueError(f"{name}: no bit widths given; {BITS_ALLOWED}")
    for b in bits_menu:
        if isinstance(b, bool) or b not in BITS_CHOICES:
            raise ValueError(f"{name}: {b!r} is not a supported width; {BITS_ALLOWED}")
    for kind, spec in (("key", base.key if base else None), ("value", base.value if base else None)):
        for b in bits_menu if spec is not None else ():
            try:
                wide = with_bits(spec, b)
                if head_dim is not None:
                    wide.check_head_dim(head_dim)
            except ValueError as err:
                raise ValueError(
                    f"{name}: {b} bits do not fit the preset's {kind} format {spec.format.value} ({err}); "
                    f"{BITS_ALLOWED} that fit it"
                ) from None


def reachable_bits(base: CacheConfig, bits_menu: tuple[int, ...]) -> tuple[float, float]:
    """(lowest, highest) average bits/element a bit allocation from ``bits_menu`` can reach with
    ``base``'s key and value formats: every tensor at its cheapest / dearest width, scales, zero points
    and outliers included (`QuantSpec.bits_per_element`; fitted codebooks cost nothing per element)."""
    lo = hi = 0.0
    for spec in (base.key, base.value):
        costs = [with_bits(spec, b).bits_per_element for b in bits_menu]
        lo, hi = lo + min(costs) / 2, hi + max(costs) / 2
    return lo, hi


def check_target_bits(
    target_bits: float, base: CacheConfig, bits_menu: tuple[int, ...], name: str = "target_bits",
    given: bool = True,
) -> None:  # fmt: skip
    """Raise unless ``target_bits`` is within `reachable_bits` (``given`` False: the value is the
    preset's own bits/element, and the message says so)."""
    lo, hi = reachable_bits(base, bits_menu)
    low, high = math.ceil(lo * 1e4) / 1e4, math.floor(hi * 1e4) / 1e4  # the shown bounds are accepted
    number = isinstance(target_bits, (int, float)) and not isinstance(target_bits, bool)
    if not (number and math.isfinite(target_bits) and lo - 1e-9 <= target_bits <= hi + 1e-9):
        what = repr(target_bits) if given else f"not given, so the preset's {target_bits:.4g}, which"
        raise ValueError(
            f"{name}: {what} is outside what widths {','.join(map(str, bits_menu))} can reach with the "
            f"preset's key and value formats; allowed: {low:g} to {high:g} bits/element (the smallest and "
            "largest width plus scale, zero-point and outlier metadata)"
        )


def check_keep_exact(base: CacheConfig, name: str = "tokens.keep_exact") -> None:
    """Raise unless ``base``'s token policy keeps a fraction of tokens exact, which is what a
    token-policy calibration spreads over the layers."""
    keep = base.tokens.keep_exact if base.tokens is not None else None
    if isinstance(keep, bool) or not isinstance(keep, float) or not 0 < keep <= 1:
        raise ValueError(
            f"{name}: keep_exact {keep!r}; calibrating a token policy spreads a keep_exact fraction over "
            "layers, allowed: a token policy whose keep_exact is a fraction in (0, 1]"
        )


def effective_base(base: CacheConfig, model_config: Any) -> tuple[CacheConfig, str]:
    """``base`` as calibration runs it on this model, and a note when it changed: pre-RoPE keys are
    turned off for a model without a standard RoPE (`rope_for`)."""
    if not base.pre_rope_keys:
        return base, ""
    text = model_config.get_text_config(decoder=True)
    _, why = rope_for(text, model_fingerprint(model_config)["head_dim"])
    if not why:
        return base, ""
    return base.replace(pre_rope_keys=False), f"pre-RoPE keys unavailable ({why}); calibrating post-RoPE keys"


def reused_calibration(
    reuse: dict, bits_menu: tuple[int, ...], name: str = "reuse"
) -> tuple[Sensitivity, Codebooks]:
    """The sensitivities and codebooks (of the widths in ``bits_menu``) of the ``"calibration"`` entry
    of an earlier bit-allocation calibration; raise when it is not one or measured no such width."""
    allowed = REUSE_ALLOWED
    try:
        if not isinstance(reuse["sensitivity_protocol"], str):
            raise TypeError("sensitivity_protocol")
        sens = {k: {int(layer): {int(b): float(v) for b, v in d.items()}
                    for layer, d in reuse["sensitivity"][k].items()}
                for k in ("key", "value")}  # fmt: skip
        codebooks = {k: {int(layer): {int(b): tuple(float(x) for x in v) for b, v in per.items()}
                         for layer, per in reuse.get("codebooks", {}).get(k, {}).items()}
                     for k in ("key", "value")}  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{name}: its calibration has a bad or missing entry ({err}); {allowed}") from None
    if not sens["key"] or set(sens["key"]) != set(sens["value"]):
        raise ValueError(
            f"{name}: its sensitivities do not cover keys and values of the same layers; {allowed}"
        )
    measured = set.intersection(*(set(d) for per in sens.values() for d in per.values()))
    missing = sorted(set(bits_menu) - measured)
    if missing:
        raise ValueError(
            f"{name}: holds no sensitivities for widths {missing} (it measured {sorted(measured)}); allowed: "
            f"widths from {sorted(measured)}, or a new calibration without reuse"
        )

    def keep(per_kind: dict) -> dict:
        return {k: {layer: {b: v for b, v in d.items() if b in bits_menu} for layer, d in per.items()}
                for k, per in per_kind.items()}  # fmt: skip

    return keep(sens), keep(codebooks)


def check_reuse_file(data: Any, name: str = "reuse") -> None:
    """Raise unless ``data`` (a parsed JSON file) is shaped like a bit-allocation calibration file:
    ``config`` and ``calibration`` objects, the latter with the slice ``tokens`` [start, end]."""
    if not isinstance(data, dict) or not isinstance(data.get("calibration"), dict):
        raise ValueError(f"{name}: has no 'calibration' object; {REUSE_ALLOWED}")
    if not isinstance(data.get("config"), dict):
        raise ValueError(f"{name}: has no 'config' object; {REUSE_ALLOWED}")
    if "layer_keep_exact" in data["calibration"]:
        raise ValueError(f"{name}: is a token-policy calibration (keep_exact per layer); {REUSE_ALLOWED}")
    tokens = data["calibration"].get("tokens")
    if not (isinstance(tokens, list) and len(tokens) == 2 and all(type(t) is int for t in tokens)):
        raise ValueError(f"{name}: its calibration has no slice 'tokens' [start, end]; {REUSE_ALLOWED}")


def check_reuse_model(data: dict, base: CacheConfig, model_config: Any, name: str = "reuse") -> None:
    """Raise unless the calibration file ``data`` was made for this model (its ``"model"``
    fingerprint, or the ``calibration.model_fingerprint`` of older files) and with ``base``'s formats
    (its config without per-layer overrides, widths and codebooks)."""
    from .bundled import fingerprint

    want = model_fingerprint(model_config)
    if "model" in data:
        got, here = data["model"], want
    else:
        got, here = data["calibration"].get("model_fingerprint"), fingerprint(model_config)
    if got is None:
        raise ValueError(f"{name}: records no model fingerprint ('model'); {REUSE_ALLOWED}")
    if got != here:
        raise ValueError(f"{name}: was made for the model {got}, not this one {here}; {REUSE_ALLOWED}")
    try:
        made = CacheConfig.from_dict(data["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{name}: its 'config' does not load ({err}); {REUSE_ALLOWED}") from None

    def formats(config: CacheConfig) -> dict:
        out = config.replace(layer_overrides=(), model_fingerprint=()).to_dict()
        for kind in ("key", "value"):
            out[kind] = out[kind] and {k: v for k, v in out[kind].items() if k not in ("bits", "codebook")}
        return out

    if formats(made) != formats(base):
        diff = sorted(k for k, v in formats(made).items() if formats(base).get(k) != v)
        raise ValueError(
            f"{name}: was calibrated with other formats than this preset (differs in {diff}); allowed: a "
            "calibration made with the same preset"
        )


def check_reuse_slice(data: dict, start: int, total: int, name: str = "reuse") -> None:
    """Raise unless the file's sensitivities were measured on this slice (token ids [start, total))."""
    got = data["calibration"]["tokens"]
    if got != [start, total]:
        raise ValueError(
            f"{name}: was calibrated on token ids [{got[0]}, {got[1]}) of its text; this run's slice is "
            f"[{start}, {total}); allowed: the same text and slice length ({got[1] - got[0]} tokens)"
        )
