"""Shared fixtures: the tiny random Llama used by the CLI and eval tests.

2 layers, 4 query heads, 2 KV heads, head_dim 64 (presets group 64 channels), 4096 positions,
the embedded model's vocabulary size, saved with the real SmolLM2 tokenizer so that prompts are
real text tokens. Everything on it runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one torch thread is faster and immune to CPU oversubscription.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float_key_dot():
    """The fused kernel's float32 key dot product, for tests with tolerances measured on it: where the
    CPU has VNNI or AVX2 the default quantizes queries to int8 (tests/test_fused_formats.py bounds
    what that costs). Modules opt in like ``one_thread``."""
    from kvsqueeze.kernels import cpu

    if not cpu.available():
        yield
        return
    with cpu.using_key_dot("float"):
        yield


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """The tiny random Llama (seed 0), in eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama) -> Path:
    """A folder holding the tiny Llama and the SmolLM2 tokenizer (needs the embedded model's files)."""
    from kvsqueeze.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(folder)
    return folder
