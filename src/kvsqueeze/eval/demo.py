"""The main job: one long prompt through the exact cache and every preset, one table.

For each preset: KV bytes held per token (everything the cache holds, measured), the packed
bytes per token (analytic, the long-context limit), both as compression vs an fp16 cache, greedy-token
agreement with the exact cache (teacher-forced, position by position) and decode tokens/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import resolve_config
from ..integrations.cache import SqueezedCache
from .demo_text import DEMO_DOCUMENT, DEMO_QUESTION
from .generation import agreement, greedy_decode

DEFAULT_DEMO_PRESETS = ("none", "int8", "fp8", "k4v4", "k4v2", "k2v2")


@dataclass(frozen=True)
class DemoRow:
    preset: str
    bytes_per_token: float
    packed_bytes_per_token: float
    compression_vs_fp16: float
    packed_compression_vs_fp16: float
    agreement: float
    first_divergence: int
    decode_tokens_per_s: float
    text: str


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
    presets: tuple[str, ...] = DEFAULT_DEMO_PRESETS,
    new_tokens: int = 128,
    progress: bool = True,
) -> list[DemoRow]:
    """Run the exact cache first, then each preset teacher-forced on the exact tokens."""
    for name in presets:
        resolve_config(name)
    input_ids = demo_prompt(tokenizer)
    cfg = model.config.get_text_config(decoder=True)
    num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp16_per_token = 2 * 2 * cfg.num_hidden_layers * num_kv_heads * head_dim
    exact_bytes = torch.finfo(model.dtype).bits // 8
    exact = greedy_decode(
        model, input_ids, SqueezedCache.from_model(model, "none"), new_tokens, progress=progress, desc="exact"
    )
    rows = []
    for name in presets:
        cache = SqueezedCache.from_model(model, name)
        run = greedy_decode(
            model, input_ids, cache, new_tokens, forced=exact.tokens, progress=progress, desc=name
        )
        agree, first = agreement(exact.argmax, run.argmax)
        held = cache.nbytes() / cache.get_seq_length()
        # the cache's own config: best-* names resolve to the model's bundled calibration
        packed = cache.cache_config.bytes_per_token(
            cfg.num_hidden_layers, num_kv_heads, head_dim, exact_bytes
        )
        rows.append(
            DemoRow(
                preset=name,
                bytes_per_token=held,
                packed_bytes_per_token=packed,
                compression_vs_fp16=fp16_per_token / held,
                packed_compression_vs_fp16=fp16_per_token / packed,
                agreement=agree,
                first_divergence=first,
                decode_tokens_per_s=run.tokens_per_second,
                text=tokenizer.decode(run.argmax[:first]),
            )
        )
    return rows


def rows_to_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
