"""Per-layer bit allocation (KVTuner-style): measure each layer's sensitivity, then spend a bit budget.

Sensitivity is measured by the model's output error on calibration text: for one layer at a time
and one tensor kind (keys or values) at one bit width, every other tensor stays exact; the
calibration tokens are prefilled (``sink_tokens + prefill_tokens``, all of it quantized: no
residual window) and the mean KL(exact || quantized) of the next ``score_tokens`` predictions is
the sensitivity. Assuming the errors add up, `allocate` solves the multiple-choice knapsack
greedily: every tensor starts at the lowest width, and the upgrade with the largest drop of
sensitivity per added bit is taken while the average bits/element stays within the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..config import CacheConfig, LayerOverride
from ..quant.spec import QuantSpec

Sensitivity = dict[str, dict[int, dict[int, float]]]  # kind -> layer -> bits -> mean KLD
SpecFor = Callable[[str, int, int], QuantSpec]  # (kind, layer, bits) -> spec


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    ref, test = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (ref.exp() * (ref - test)).sum(-1).mean().item()


def _score(model: Any, ids: torch.Tensor, make_cache: Callable[[], Any], prefill: int) -> torch.Tensor:
    cache = make_cache()
    with torch.inference_mode():
        model(input_ids=ids[None, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
        out = model(input_ids=ids[None, prefill:], cache=cache, use_cache=True)
    return out.logits[0]


def measure(
    model: Any,
    ids: torch.Tensor,
    base: CacheConfig,
    spec_for: SpecFor,
    bits_menu: tuple[int, ...],
    layers: list[int],
    prefill_tokens: int = 256,
    progress: Callable[[str], None] | None = None,
) -> Sensitivity:
    """Sensitivity of every (kind, layer, bits); ``ids`` (tokens,) holds prefill plus scored tokens."""
    from transformers import DynamicCache

    from ..integrations.cache import SqueezedCache

    prefill = base.sink_tokens + prefill_tokens
    if prefill_tokens < 1 or prefill >= ids.numel():
        raise ValueError(
            f"prefill_tokens: {prefill_tokens} with {base.sink_tokens} sinks leaves no scored token of the "
            f"{ids.numel()} given; allowed: 1 to {ids.numel() - base.sink_tokens - 1}"
        )
    exact = _score(model, ids, lambda: DynamicCache(config=model.config), prefill)
    probe = base.replace(key=None, value=None, residual_window=0, layer_overrides=())
    sens: Sensitivity = {"key": {}, "value": {}}
    for kind in ("key", "value"):
        for layer in layers:
            sens[kind][layer] = {}
            for bits in bits_menu:
                spec = spec_for(kind, layer, bits)
                over = LayerOverride(
                    layer, spec if kind == "key" else None, spec if kind == "value" else None
                )
                cfg = probe.replace(layer_overrides=(over,))
                logits = _score(model, ids, lambda cfg=cfg: SqueezedCache(cfg, model.config), prefill)
                sens[kind][layer][bits] = _kl(exact, logits)
            if progress:
                progress(
                    f"{kind} layer {layer}: "
                    + ", ".join(f"{b}b {v:.5f}" for b, v in sens[kind][layer].items())
                )
    return sens


def allocate(sens: Sensitivity, spec_for: SpecFor, target_bits: float) -> dict[tuple[str, int], int]:
    """Bits per (kind, layer) with mean ``spec.bits_per_element`` <= ``target_bits`` (greedy)."""
    if (
        isinstance(target_bits, bool)
        or not isinstance(target_bits, (int, float))
        or not math.isfinite(target_bits)
    ):
        raise ValueError(f"target_bits: {target_bits!r}; allowed: a finite number of bits per element")
    choice = {(k, layer): min(bits) for k, per_layer in sens.items() for layer, bits in per_layer.items()}
    if not choice:
        raise ValueError("sens: no layer measured; allowed: sensitivities of at least one layer")

    def cost(kind: str, layer: int, bits: int) -> float:
        return spec_for(kind, layer, bits).bits_per_element

    total = sum(cost(k, layer, b) for (k, layer), b in choice.items())
    budget = target_bits * len(choice)
    if total > budget + 1e-9:
        raise ValueError(
            f"target_bits: {target_bits} is below the lowest width's {total / len(choice):.3f} b/el"
        )
    while True:
        best = None
        for (kind, layer), bits in choice.items():
            wider = sorted(b for b in sens[kind][layer] if b > bits)
            for b in wider:
                extra = cost(kind, layer, b) - cost(kind, layer, bits)
                if total + extra > budget + 1e-9:
                    continue
                gain = (sens[kind][layer][bits] - sens[kind][layer][b]) / extra
                if best is None or gain > best[0]:
                    best = (gain, kind, layer, b, extra)
        if best is None or best[0] <= 0:
            return choice
        _, kind, layer, b, extra = best
        choice[(kind, layer)] = b
        total += extra


def layer_sensitivity(
    model: Any,
    ids: torch.Tensor,
    base: CacheConfig,
    layers: list[int],
    prefill_tokens: int = 256,
    progress: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """Per layer: sensitivity (`measure`) of its keys plus its values at ``base``'s own specs."""
    plain = base.replace(tokens=None, layer_overrides=())
    if plain.key is None or plain.value is None:
        raise ValueError("preset: layer sensitivity needs a base config with key and value specs")
    label = plain.key.bits

    def spec_for(kind: str, layer: int, bits: int) -> QuantSpec:
        return plain.key if kind == "key" else plain.value

    sens = measure(model, ids, plain, spec_for, (label,), layers, prefill_tokens, progress)
    return {layer: sens["key"][layer][label] + sens["value"][layer][label] for layer in layers}


KEEP_EXACT_POWER = 2.0
"""Exponent on sensitivity in `keep_exact_by_layer`. A layer's loss falls faster than linearly with
its exact share (SmolLM2-135M, k2v2: half of layer 18's tokens exact removes a third of its loss, all
of them all of it), so the budget is better concentrated than spread: on the embedded model, linear
shares (power 1) recover 48 % of k2v2's perplexity loss, power 1.5 / 2 / 3 recover 69 / 70 / 68 %."""


def keep_exact_by_layer(
    sensitivity: dict[int, float], mean: float, power: float = KEEP_EXACT_POWER
) -> dict[int, float]:
    """Per-layer ``keep_exact`` fractions averaging ``mean``, by water-filling on sensitivity.

    Layer ``L`` keeps ``min(1, c * s_L ** power)`` of its tokens exact, ``c`` chosen so the fractions
    average ``mean``: the budget goes where one layer's quantization costs the most, and a layer never
    gets more than all of its tokens. Equal (or all-zero) sensitivities give every layer ``mean``.
    """
    if not 0 <= mean <= 1:
        raise ValueError(f"tokens.keep_exact: {mean!r} must be a fraction in [0, 1]")
    s = {layer: max(0.0, float(v)) ** power for layer, v in sorted(sensitivity.items())}
    positive = [v for v in s.values() if v > 0]
    budget = mean * len(s)
    if mean in (0, 1) or not positive:
        return {layer: float(mean) for layer in s}
    if len(positive) <= budget:  # every sensitive layer entirely exact, the rest spread evenly
        rest = (budget - len(positive)) / (len(s) - len(positive))
        out = {layer: 1.0 if v > 0 else rest for layer, v in s.items()}
    else:  # bisect c in (0, 1 / min s]: at the upper end every sensitive layer is saturated
        lo, hi = 0.0, 1.0 / min(positive)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(min(1.0, mid * v) for v in s.values()) < budget else (lo, mid)
        out = {layer: min(1.0, hi * v) for layer, v in s.items()}
    return {layer: round(f, 4) for layer, f in out.items()}


def overrides(choice: dict[tuple[str, int], int], spec_for: SpecFor) -> tuple[LayerOverride, ...]:
    layers = sorted({layer for _, layer in choice})
    return tuple(
        LayerOverride(
            layer,
            spec_for("key", layer, choice[("key", layer)]),
            spec_for("value", layer, choice[("value", layer)]),
        )
        for layer in layers
    )


def with_bits(spec: QuantSpec, bits: int, codebook: tuple[float, ...] | None = None) -> QuantSpec:
    """``spec`` at ``bits`` bits (a fitted ``codebook`` for nf specs, else the fixed one); nf specs
    become asymmetric int8 at 8 bits (codebooks stop at 4 bits)."""
    if spec.is_codebook and bits == 8:
        return replace(spec, bits=8, format="int", symmetric=False, codebook=None)
    return replace(spec, bits=bits, codebook=codebook if spec.is_codebook else None)
