"""The main job: one long prompt through the exact cache and every preset, one table.

For each preset: KV bytes held per token (everything the cache holds, measured), the packed
bytes per token (the long-context limit, as `kvsqueeze presets` shows it), both as compression vs
an fp16 cache, greedy-token agreement with the exact cache (teacher-forced, position by position)
and decode tokens/s; each row also holds what ran (`Method.record`: the config the cache held).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..integrations.cache import SqueezedCache
from ..quant.exact import FP16
from .demo_text import DEMO_DOCUMENT, DEMO_QUESTION
from .generation import agreement, greedy_decode
from .methods import Method, resolve_method
from .quantized_reads import nothing_quantized_warning
from .report import kv_shape, record_config

DEFAULT_DEMO_PRESETS = ("none", "int8", "fp8", "k4v4", "k4v2", "k2v2")


@dataclass(frozen=True)
class DemoRow:
    """One preset's run. ``config`` and ``read_path`` are what ran (`report.method_record`);
    ``bits_per_element`` and ``packed_bytes_per_token`` its sizes as `kvsqueeze presets` shows them;
    ``quantized_tokens`` the tokens the run's last step read quantized (`quantized_reads`; None: an
    exact config) and ``warning`` why a lossy preset matches the exact cache trivially (it read none)."""

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


def demo_methods(names: Sequence[str]) -> list[Method]:
    """The demo's presets as methods: kvsqueeze presets or config JSONs (``@fused`` allowed);
    ValueError for anything else (the demo measures a `SqueezedCache`'s bytes)."""
    methods = [resolve_method(name) for name in names]
    for method in methods:
        if method.source is None:
            raise ValueError(f"preset: {method.name!r} is not a kvsqueeze preset or config JSON")
    return methods


def demo_prompt(tokenizer: object) -> torch.Tensor:
    """The built-in prompt as input ids (1, tokens), with the chat template when the model has one."""
    content = f"{DEMO_DOCUMENT}\n\n{DEMO_QUESTION}"
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
) -> list[DemoRow]:
    """Run the exact cache first, then each preset (`demo_methods`) teacher-forced on the exact tokens."""
    methods = demo_methods(presets)
    input_ids = demo_prompt(tokenizer)
    num_layers, num_kv_heads, head_dim = kv_shape(model.config)
    fp16_per_token = FP16.kv_bytes_per_token(num_layers, num_kv_heads, head_dim)
    exact = greedy_decode(
        model, input_ids, SqueezedCache.from_model(model, "none"), new_tokens, progress=progress, desc="exact"
    )
    chunk_sizes = [input_ids.shape[1]] + [1] * (new_tokens - 1)
    rows = []
    for method in methods:
        cache = method.make_cache(model)
        record = method.record(model, cache)  # the config this cache holds
        run = greedy_decode(
            model, input_ids, cache, new_tokens, forced=exact.tokens, progress=progress, desc=method.name
        )
        agree, first = agreement(exact.argmax, run.argmax)
        held = cache.nbytes() / cache.get_seq_length()
        config = record_config(record)
        quantized = method.quantized_tokens(config, chunk_sizes)
        warning = None
        if quantized == 0:
            warning = nothing_quantized_warning(method.name, config, chunk_sizes, "run")
        rows.append(
            DemoRow(
                preset=method.name,
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
            )
        )
    return rows


def rows_to_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
