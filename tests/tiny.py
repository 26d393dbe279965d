"""Tiny random-weight Llama models built from a config (no download), shared by the tests.

`tiny_llama(**overrides)`: 2 layers, 4 query heads, 2 KV heads, head_dim 64 (presets group 64
channels), a 128-token vocabulary, no BOS/EOS (generation runs to max_new_tokens), pad id 0,
seed ``seed`` (default 0), float32 unless ``dtype`` is given; ``attn`` switches it to another
attention implementation (``"kvsqueeze"``: the fused read path). Cached per arguments.
"""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BASE = dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=None,
    eos_token_id=None, pad_token_id=0,
)  # fmt: skip


@functools.cache
def _build(seed: int, dtype: torch.dtype, attn: str, overrides: tuple) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **dict(overrides)})).eval().to(dtype)
    if attn == "kvsqueeze":
        from kvsqueeze.integrations.attention import use_fused_attention

        use_fused_attention(model)
    return model


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "sdpa", **overrides: object
) -> LlamaForCausalLM:
    """The tiny Llama of this module with config ``overrides`` (e.g. ``head_dim=32``)."""
    return _build(seed, dtype, attn, tuple(sorted(overrides.items())))


def prompt_ids(n: int) -> torch.Tensor:
    """(1, n) token ids of a repeated 24-token pattern: prompt lookup finds drafts in it."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(1, 128, (1, 24), generator=g)
    return base.repeat(1, -(-n // 24))[:, :n]


@functools.cache
def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids: token i is the word ``w{i}``, id 0 is
    the pad token, id 1 ``</s>`` (an end-of-sequence token the tiny models never stop on unless a
    test asks); text is words separated by spaces. Built in code (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
