"""`inspect_model`: what ``kvsqueeze inspect`` reports, with its short measured check.

For every quantized preset (its bundled calibration where one fits the model) on one text:

* ``risk``: the `calibration.risk` error on the captured keys and values (worst layer), and
  ``predicted_risk``: the same function on the weights, which is what `SqueezedCache.from_model`
  warns about;
* ``kl`` / ``top1``: the measured check, `decode_check` — mean KL(exact || preset) and top-1
  agreement of the next-token distributions of the last ``decode_tokens`` tokens, decoded from a
  cache that holds the rest of the text;
* ``safe``: ``risk`` below `risk.UNSAFE`, and no worse a KL than a preset found unsafe (the verdict
  never calls safe what measures worse than something it calls unsafe).

The recommendation is the safe preset with the lowest measured KL within the bits budget (ties: the
fewer bits), so it never measures worse than another safe preset the budget allows.

`check_inspection` is what `inspect_model` needs of its arguments (``kvsqueeze inspect`` runs it on
its flags before it loads the model): every preset must have quantized at least one block of the
prefilled text before the checked positions (`min_prefill_tokens`), or every KL would be 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..config import PRESETS, CacheConfig
from ..integrations.rope import rope_for
from .capture import capture
from .risk import UNSAFE, Risk, assess, profiles_from_weights, samples_from_data
from .stats import layer_stats

DECODE_TOKENS = 128
CHUNK_TOKENS = 16


def quantized_presets(model_config: Any) -> dict[str, CacheConfig]:
    """Every quantized preset as `SqueezedCache` builds it for this model (a bundled calibration when
    one fits), by name: what `inspect_model` measures."""
    from ..integrations.cache import SqueezedCache

    configs = {name: SqueezedCache(name, model_config).cache_config for name in PRESETS}
    return {name: config for name, config in configs.items() if not config.is_exact}


def min_prefill_tokens(configs: dict[str, CacheConfig]) -> int:
    """The fewest prefilled tokens after which every config has packed (quantized) a block: its sinks,
    then more than its residual window and at least one block (`SinkWindowPolicy`)."""
    return max(
        (c.sink_tokens + max(c.residual_window + 1, c.block_size) for c in configs.values()), default=1
    )


def check_inspection(
    model_config: Any, num_tokens: int, max_bits: float | None, decode_tokens: int,
    names: tuple[str, str, str] = ("token_ids", "max_bits", "decode_tokens"),
) -> None:  # fmt: skip
    """Raise ValueError naming ``names`` (the token count, ``max_bits``, ``decode_tokens``) unless
    ``decode_tokens`` is a positive integer, ``num_tokens`` leaves `min_prefill_tokens` before them,
    and ``max_bits`` (None: any) is a finite number some preset fits within on this model."""
    tokens, bits, decode = names
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"{decode}: {decode_tokens!r}; allowed: a positive integer (a number of tokens)")
    configs = quantized_presets(model_config)
    prefill = min_prefill_tokens(configs)
    if num_tokens < prefill + decode_tokens:
        raise ValueError(
            f"{tokens}: {num_tokens} tokens leave {max(num_tokens - decode_tokens, 0)} to prefill before the "
            f"{decode_tokens} checked ones ({decode}); every preset needs {prefill} prefilled tokens to quantize "
            f"one block; allowed: at least {prefill + decode_tokens} tokens (or fewer {decode})"
        )
    if max_bits is None:
        return
    text = model_config.get_text_config(decoder=True)
    least = min(c.bits_per_element(num_layers=text.num_hidden_layers) for c in configs.values())
    number = isinstance(max_bits, (int, float)) and not isinstance(max_bits, bool)
    if not (number and math.isfinite(max_bits) and max_bits >= least):
        raise ValueError(
            f"{bits}: {max_bits!r} leaves no preset to recommend; allowed: a number of bits/element >= "
            f"{math.ceil(least * 1e4) / 1e4:g} (the smallest preset's on this model)"
        )


def exact_log_probs(model: Any, token_ids: torch.Tensor, decode_tokens: int = DECODE_TOKENS) -> torch.Tensor:
    """float32 (decode_tokens, vocab) next-token log-probabilities at the last ``decode_tokens``
    positions of ``token_ids`` (tokens,), from one cache-free forward: the reference of `decode_check`."""
    from ..eval.perplexity import log_softmax_f32

    if not 1 <= decode_tokens < token_ids.numel():
        raise ValueError(
            f"decode_tokens: {decode_tokens} must be in [1, {token_ids.numel() - 1}] for this text"
        )
    with torch.inference_mode():
        logits = model(
            input_ids=token_ids[None].to(model.device), use_cache=False, logits_to_keep=decode_tokens
        )
    return log_softmax_f32(logits.logits[0])


def decode_check(
    model: Any, token_ids: torch.Tensor, config: CacheConfig, reference: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[float, float]:  # fmt: skip
    """(mean KL(exact || config) in nats, top-1 agreement) of the next-token distributions at the last
    ``len(reference)`` positions of ``token_ids`` (tokens,): the rest is prefilled into a
    `SqueezedCache` of ``config``, then these positions are decoded ``chunk_tokens`` at a time and
    compared with ``reference`` (`exact_log_probs`)."""
    from ..eval.perplexity import kl_divergence, log_softmax_f32
    from ..integrations.cache import SqueezedCache

    ids = token_ids[None].to(model.device)
    prefill = ids.shape[1] - reference.shape[0]
    with torch.inference_mode():
        cache = SqueezedCache(config, model.config, fused=False)
        model(input_ids=ids[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
        tested = [
            model(input_ids=ids[:, s : s + chunk_tokens], cache=cache, use_cache=True).logits[0]
            for s in range(prefill, ids.shape[1], chunk_tokens)
        ]
    test = log_softmax_f32(torch.cat(tested))
    agree = (reference.argmax(-1) == test.argmax(-1)).double().mean().item()
    return max(kl_divergence(reference, test).mean().item(), 0.0), agree  # float noise can dip below 0


def recommend(presets: dict[str, dict], max_bits: float | None) -> str | None:
    """The safe preset with the lowest measured ``kl`` (ties: fewer bits) among ``presets`` (name ->
    `inspect_model` row) within ``max_bits`` bits per element (None: any); None when there is none."""
    allowed = [
        n for n, r in presets.items() if r["safe"] and (max_bits is None or r["bits_per_element"] <= max_bits)
    ]
    return min(allowed, key=lambda n: (presets[n]["kl"], presets[n]["bits_per_element"]), default=None)


def inspect_model(
    model: Any, token_ids: torch.Tensor, max_bits: float | None = None, decode_tokens: int = DECODE_TOKENS
) -> dict:
    """Per-layer stats of the keys and values of ``token_ids`` (tokens,), and for every quantized preset
    its risk on them and from the weights, its measured decode KL and top-1 agreement and its verdict;
    ``recommended``: `recommend` within ``max_bits``. Presets come sorted by measured KL."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1:
        raise ValueError("token_ids: allowed: a tensor of shape (tokens,)")
    check_inspection(model.config, token_ids.numel(), max_bits, decode_tokens)
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope, _ = rope_for(text, head_dim)
    captured = capture(model, token_ids, rope)
    layers = {str(i): layer_stats(captured.keys[i], captured.values[i]) for i in sorted(captured.keys)}
    profiles = profiles_from_weights(model)
    data = samples_from_data(captured.keys, captured.values, profiles)
    weights = {i: p.sample() for i, p in profiles.items() if i in data}
    reference = exact_log_probs(model, token_ids, decode_tokens)
    presets = {}
    for name, config in quantized_presets(model.config).items():  # bundled calibrations when they fit
        risk = assess(data, config, rope)
        predicted = assess(weights, config, rope) if weights else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the store's overflow warning: named by the risk check
            kl, top1 = decode_check(model, token_ids, config, reference)
        presets[name] = _row(config, text.num_hidden_layers, risk, predicted, kl, top1)
    unsafe_kl = min((r["kl"] for r in presets.values() if not r["safe"]), default=float("inf"))
    for r in presets.values():
        if r["safe"] and r["kl"] >= unsafe_kl:
            r["safe"] = False
            r["problems"].insert(0, f"measures a decode KL {r['kl']:.2e} >= that of a preset found unsafe")
    presets = dict(sorted(presets.items(), key=lambda item: item[1]["kl"]))
    return {
        "pre_rope": rope is not None,
        "tokens": token_ids.numel(),
        "decode_tokens": decode_tokens,
        "unsafe_threshold": UNSAFE,
        "layers": layers,
        "presets": presets,
        "max_bits": max_bits,
        "recommended": recommend(presets, max_bits) or "none",
    }


def _row(
    config: CacheConfig, num_layers: int | None, risk: Risk, predicted: Risk | None, kl: float, top1: float
) -> dict:
    worst = max(risk.layers, key=lambda r: r.error, default=None)
    return {
        "bits_per_element": config.bits_per_element(num_layers=num_layers),
        "risk": risk.error,
        "risk_layer": None if worst is None else worst.layer,
        "key_error": 0.0 if worst is None else worst.key_error,
        "value_error": 0.0 if worst is None else worst.value_error,
        "predicted_risk": None if predicted is None else predicted.error,
        "predicted_unsafe": None if predicted is None else predicted.unsafe,
        "overflow_layers": [r.layer for r in risk.layers if r.overflow],
        "kl": kl if kl == kl else float("inf"),  # NaN logits: as bad as it gets
        "top1": top1,
        "safe": not risk.unsafe,
        "problems": risk.problems(),
    }
