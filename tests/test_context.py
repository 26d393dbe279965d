"""The context limit follows the model: max_position_embeddings, extended by RoPE scaling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvsqueeze import SqueezedCache
from kvsqueeze.integrations.context import context_limit

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(
    vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
)  # fmt: skip


def rope(rope_type: str, factor: float | None = None, original: int | None = None) -> dict:
    params: dict = {"rope_type": rope_type, "rope_theta": 10000.0}
    if factor is not None:
        params["factor"] = factor
    if original is not None:
        params["original_max_position_embeddings"] = original
    return params


@pytest.mark.parametrize(
    "params, tokens, source",
    [
        (None, 256, "max_position_embeddings 256"),
        (rope("default"), 256, "max_position_embeddings 256"),
        (rope("yarn", 4.0, 256), 1024, "original_max_position_embeddings 256 x rope factor 4 (yarn)"),
        # transformers fills original_max_position_embeddings from max_position_embeddings
        (rope("yarn", 4.0), 1024, "original_max_position_embeddings 256 x rope factor 4 (yarn)"),
        (rope("linear", 2.0), 512, "max_position_embeddings 256 x rope factor 2 (linear)"),
        (rope("yarn", 2.0, 64), 256, "max_position_embeddings 256"),  # the config already extends it
        (rope("dynamic", 2.0), None, "rope_type 'dynamic' rescales at any length"),
    ],
)
def test_context_limit_reads_rope_scaling(params: dict | None, tokens: int | None, source: str) -> None:
    config = Qwen2Config(**SMALL, **({"rope_parameters": params} if params else {}))
    limit = context_limit(config)
    assert (limit.tokens, limit.source) == (tokens, source)


def run(model: torch.nn.Module, n: int, cache: object) -> None:
    with torch.no_grad():
        model(torch.randint(1, 64, (1, n)), cache=cache)


@pytest.mark.parametrize("preset", ["k4v4", "none"])
def test_yarn_model_runs_past_max_position_embeddings(preset: str) -> None:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL, rope_parameters=rope("yarn", 4.0, 256))).eval()
    run(model, 600, SqueezedCache.from_model(model, preset))  # DynamicCache runs it too
    cache = SqueezedCache.from_model(model, preset)
    run(model, 1000, cache)
    with pytest.raises(
        ValueError, match=r"1030 tokens exceed the model's context of 1024 \(original_max_position"
    ):
        run(model, 30, cache)
    assert cache.get_seq_length() == 1000


def test_plain_model_refuses_past_max_position_embeddings() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    with pytest.raises(
        ValueError, match=r"300 tokens exceed the model's context of 256 \(max_position_embeddings 256\)"
    ):
        run(model, 300, SqueezedCache.from_model(model, "k4v4"))
