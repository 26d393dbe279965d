"""What the subcommands share: the stderr console and a model's KV shape."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
out = Console()


def model_shape(model_config: object) -> tuple[int, int, int, int]:
    """(num_layers, num_kv_heads, head_dim, max_tokens) of a transformers config."""
    cfg = model_config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim, getattr(cfg, "max_position_embeddings", 0)
