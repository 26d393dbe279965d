"""The main job: one long prompt through the exact cache and every preset, one table.

For each preset: KV bytes held per token (everything the cache holds, measured), the packed
bytes per token (the long-context limit, as `kvsqueeze presets` shows it), both as compression vs
an fp16 cache, greedy-token agreement with the exact cache (teacher-forced, position by position)
and decode tokens/s on the fused read path (the default), with the reference path's tokens/s
beside it (fewer steps: speed only) and both speed-ups; each row also holds what ran
(`Method.record`: the config the cache held). The prompt is the built-in report, repeated until it
reaches the demo's context (default `DEFAULT_DEMO_CONTEXT` tokens), where reading the cache
dominates a decode step and the read paths differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..config import CacheConfig, preset
from ..integrations.cache import SqueezedCache
from ..quant.exact import FP16
from .demo_text import DEMO_DOCUMENT, DEMO_QUESTION
from .generation import agreement, greedy_decode
from .methods import FUSED_SUFFIX, Method, resolve_method
from .quantized_reads import nothing_quantized_warning
from .report import kv_shape, record_config

DEFAULT_DEMO_PRESETS = ("none", "int8", "fp8", "k4v4", "k4v2", "k2v2")
DEFAULT_DEMO_CONTEXT = 4000  # prompt tokens: the issue-16 figures are taken at 4k
DEFAULT_REFERENCE_TOKENS = 32  # decode steps timed on the reference path


@dataclass(frozen=True)
class DemoRow:
    """One preset's run. ``config`` and ``read_path`` are what ran (`report.method_record`);
    ``bits_per_element`` and ``packed_bytes_per_token`` its sizes as `kvsqueeze presets` shows them;
    ``quantized_tokens`` the tokens the run's last step read quantized (`quantized_reads`; None: an
    exact config) and ``warning`` why a lossy preset matches the exact cache trivially (it read none).
    ``decode_tokens_per_s``: the run (its read path); ``reference_tokens_per_s``: the same cache read
    by the reference path (None: not measured, or a token policy only the fused path runs);
    ``exact_tokens_per_s``: the exact cache in this demo."""

    preset: str
    config: dict
    read_path: str
    bits_per_element: float
    bytes_per_token: float
    packed_bytes_per_token: float
    compression_vs_fp16: float
    packed_compression_vs_fp16: float
    quantized_tokens: int | None
    warning: str | None
    agreement: float
    first_divergence: int
    decode_tokens_per_s: float
    text: str
    reference_tokens_per_s: float | None = None
    exact_tokens_per_s: float | None = None

    @property
    def speedup_vs_reference(self) -> float | None:
        """Decode tokens/s of the run over the reference path's (None when not measured)."""
        ref = self.reference_tokens_per_s
        return None if not ref else self.decode_tokens_per_s / ref

    @property
    def speedup_vs_exact(self) -> float | None:
        ref = self.exact_tokens_per_s
        return None if not ref else self.decode_tokens_per_s / ref


def demo_methods(names: Sequence[str], fused: bool = True) -> list[Method]:
    """The demo's presets as methods: kvsqueeze presets or config JSONs, read by the fused path
    (``fused``; a name may say ``@fused`` itself) or as named; ValueError for anything else (the
    demo measures a `SqueezedCache`'s bytes)."""
    methods = [resolve_method(name) for name in names]
    for method in methods:
        if method.source is None:
            raise ValueError(f"preset: {method.name!r} is not a kvsqueeze preset or config JSON")
    if not fused:
        return methods
    return [resolve_method(name if name.endswith(FUSED_SUFFIX) else name + FUSED_SUFFIX) for name in names]


def _reference_method(name: str) -> Method | None:
    """``name`` (a preset or config path as given, ``@fused`` or not) on the reference path, or None
    for a config only the fused path runs."""
    method = resolve_method(name.removesuffix(FUSED_SUFFIX))
    config = method.source if isinstance(method.source, CacheConfig) else preset(method.source)
    return method if "reference" in config.read_paths else None


def demo_prompt(tokenizer: object, context_tokens: int | None = None) -> torch.Tensor:
    """The built-in prompt as input ids (1, tokens), with the chat template when the model has one:
    the report, then the question. With ``context_tokens``, the report is followed by copies of
    itself (announced), cut to make the prompt about ``context_tokens`` tokens long; never shorter
    than one copy."""
    once = _prompt_ids(tokenizer, DEMO_DOCUMENT)
    if context_tokens is None or context_tokens <= once.shape[1]:
        return once
    doc = tokenizer(DEMO_DOCUMENT, add_special_tokens=False).input_ids
    budget = context_tokens - (once.shape[1] - len(doc))  # tokens left for the document part
    copies = [DEMO_DOCUMENT]
    while len(copies) * len(doc) < budget:
        copies.append(f"(The same report again, copy {len(copies) + 1}.)\n\n{DEMO_DOCUMENT}")
    ids = tokenizer("\n\n".join(copies), add_special_tokens=False).input_ids[:budget]
    return _prompt_ids(tokenizer, tokenizer.decode(ids))


def _prompt_ids(tokenizer: object, document: str) -> torch.Tensor:
    content = f"{document}\n\n{DEMO_QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(content, return_tensors="pt").input_ids
    return ids


def run_demo(
    model: torch.nn.Module,
    tokenizer: object,
    presets: Sequence[str] = DEFAULT_DEMO_PRESETS,
    new_tokens: int = 128,
    progress: bool = True,
    context_tokens: int | None = None,
    fused: bool = True,
    reference_tokens: int = DEFAULT_REFERENCE_TOKENS,
) -> list[DemoRow]:
    """Run the exact cache first, then each preset (`demo_methods`, on the fused path when ``fused``)
    teacher-forced on the exact tokens over the prompt of ``context_tokens`` tokens (`demo_prompt`);
    then, when ``reference_tokens`` > 0 and the run was fused, the same cache on the reference path for
    ``min(reference_tokens, new_tokens)`` steps (its speed only)."""
    methods = demo_methods(presets, fused=fused)
    input_ids = demo_prompt(tokenizer, context_tokens)
    num_layers, num_kv_heads, head_dim = kv_shape(model.config)
    fp16_per_token = FP16.kv_bytes_per_token(num_layers, num_kv_heads, head_dim)
    exact = greedy_decode(
        model, input_ids, SqueezedCache.from_model(model, "none"), new_tokens, progress=progress, desc="exact"
    )
    chunk_sizes = [input_ids.shape[1]] + [1] * (new_tokens - 1)
    rows = []
    for name, method in zip(presets, methods, strict=True):
        cache = method.make_cache(model)
        record = method.record(model, cache)  # the config this cache holds
        run = greedy_decode(
            model, input_ids, cache, new_tokens, forced=exact.tokens, progress=progress, desc=method.name
        )
        agree, first = agreement(exact.argmax, run.argmax)
        reference_speed = None
        reference = (
            _reference_method(name) if method.name.endswith(FUSED_SUFFIX) else None
        )  # as given: a path
        steps = min(reference_tokens, new_tokens)
        if reference is not None and steps > 0:
            reference_speed = greedy_decode(
                model,
                input_ids,
                reference.make_cache(model),
                steps,
                forced=exact.tokens[:steps],
                progress=progress,
                desc=f"{reference.name} (reference path)",
            ).tokens_per_second
        held = cache.nbytes() / cache.get_seq_length()
        config = record_config(record)
        quantized = method.quantized_tokens(config, chunk_sizes)
        warning = None
        if quantized == 0:
            warning = nothing_quantized_warning(method.name, config, chunk_sizes, "run")
        rows.append(
            DemoRow(
                preset=name,
                config=record["config"],
                read_path=record["read_path"],
                bits_per_element=record["bits_per_element"],
                bytes_per_token=held,
                packed_bytes_per_token=record["bytes_per_token"],
                compression_vs_fp16=fp16_per_token / held,
                packed_compression_vs_fp16=fp16_per_token / record["bytes_per_token"],
                quantized_tokens=quantized,
                warning=warning,
                agreement=agree,
                first_divergence=first,
                decode_tokens_per_s=run.tokens_per_second,
                text=tokenizer.decode(run.argmax[:first]),
                reference_tokens_per_s=reference_speed,
                exact_tokens_per_s=exact.tokens_per_second,
            )
        )
    return rows


def rows_to_dicts(rows: list[DemoRow]) -> list[dict]:
    """The rows as dicts (the speed-ups included)."""
    return [
        {**asdict(r), "speedup_vs_reference": r.speedup_vs_reference, "speedup_vs_exact": r.speedup_vs_exact}
        for r in rows
    ]
