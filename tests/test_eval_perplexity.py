"""Perplexity / KL evaluation on toy logits and on a tiny random-weight Llama."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvsqueeze.eval.perplexity import (
    StreamSpec,
    full_sequence_perplexity,
    kl_divergence,
    log_softmax_f32,
    streamed_logprobs,
    streamed_perplexity,
    summarize,
    target_nll,
)
from kvsqueeze.eval.text import load_text, tokenize_text

VOCAB_SIZE = 128


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB_SIZE, (400,), generator=generator)


def dynamic_cache(model: LlamaForCausalLM) -> DynamicCache:
    return DynamicCache(config=model.config)


class NoisyKeyCache(DynamicCache):
    """A deliberately lossy cache: Gaussian noise on every stored key."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        noise = torch.randn(key_states.shape, generator=torch.Generator().manual_seed(layer_idx))
        return super().update(key_states + 2.0 * noise, value_states, layer_idx, *args, **kwargs)


SPEC = StreamSpec(window_tokens=96, num_windows=2, prefill_tokens=32, chunk_tokens=16)


def test_toy_logits_all_mass_on_target_give_ppl_one() -> None:
    targets = torch.tensor([3, 0, 7, 7, 1])
    logits = torch.full((5, 8), -1e4)
    logits[torch.arange(5), targets] = 1e4
    result = summarize(target_nll(log_softmax_f32(logits), targets))
    assert result.ppl == pytest.approx(1.0, abs=1e-12)
    assert result.num_scored == 5


def test_toy_uniform_logits_give_ppl_vocab_size() -> None:
    targets = torch.tensor([3, 0, 7])
    log_probs = log_softmax_f32(torch.zeros(3, 8))
    result = summarize(target_nll(log_probs, targets), kl_divergence(log_probs, log_probs))
    assert result.ppl == pytest.approx(8.0, rel=1e-6)
    assert result.nll_stderr == pytest.approx(0.0, abs=1e-7)
    assert result.kld_mean == pytest.approx(0.0, abs=1e-12)


def test_streamed_dynamic_cache_matches_full_sequence(model, token_ids) -> None:
    streamed = streamed_perplexity(model, token_ids, dynamic_cache, SPEC, progress=False)
    full = full_sequence_perplexity(model, token_ids, SPEC, progress=False)
    assert streamed.num_scored == full.num_scored == 2 * 95
    assert streamed.ppl == pytest.approx(full.ppl, rel=1e-4)
    assert streamed.mean_nll == pytest.approx(full.mean_nll, rel=1e-4)


def test_default_cache_none_matches_dynamic_cache(model, token_ids) -> None:
    explicit = streamed_perplexity(model, token_ids, dynamic_cache, SPEC, progress=False)
    default = streamed_perplexity(model, token_ids, lambda _model: None, SPEC, progress=False)
    assert default.mean_nll == pytest.approx(explicit.mean_nll, rel=1e-9)


def test_chunk_size_one_matches_chunk_size_sixteen(model, token_ids) -> None:
    spec_16 = StreamSpec(window_tokens=64, num_windows=1, prefill_tokens=8, chunk_tokens=16)
    spec_1 = StreamSpec(window_tokens=64, num_windows=1, prefill_tokens=8, chunk_tokens=1)
    logprobs_16, top1_16 = streamed_logprobs(model, token_ids, dynamic_cache, spec_16, progress=False)
    logprobs_1, top1_1 = streamed_logprobs(model, token_ids, dynamic_cache, spec_1, progress=False)
    assert logprobs_1.shape == logprobs_16.shape == (1, 63)
    torch.testing.assert_close(logprobs_1, logprobs_16, rtol=1e-4, atol=1e-4)
    assert (top1_1 == top1_16).float().mean() > 0.95


def test_exact_cache_against_itself_has_zero_kld(model, token_ids) -> None:
    result = streamed_perplexity(
        model, token_ids, dynamic_cache, SPEC, reference=dynamic_cache, progress=False
    )
    assert result.kld_mean is not None and abs(result.kld_mean) < 1e-6
    assert result.kld_p99 is not None and abs(result.kld_p99) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.reference_ppl == pytest.approx(result.ppl, rel=1e-12)
    assert set(result.to_dict()) >= {"ppl", "ppl_stderr", "num_scored", "kld_mean", "top1_agreement"}


def test_lossy_cache_has_positive_kld(model, token_ids) -> None:
    exact = streamed_perplexity(model, token_ids, dynamic_cache, SPEC, progress=False)
    result = streamed_perplexity(
        model,
        token_ids,
        lambda m: NoisyKeyCache(config=m.config),
        SPEC,
        reference=dynamic_cache,
        progress=False,
    )
    assert result.kld_mean is not None and result.kld_mean > 1e-6
    assert result.kld_p99 is not None and result.kld_p99 >= result.kld_mean
    assert result.top1_agreement is not None and result.top1_agreement < 1.0
    assert result.reference_ppl == pytest.approx(exact.ppl, rel=1e-9)
    assert result.ppl != pytest.approx(exact.ppl, rel=1e-9)


def test_window_order_does_not_change_the_mean(model, token_ids) -> None:
    windows = token_ids[: SPEC.num_windows * SPEC.window_tokens].reshape(SPEC.num_windows, -1)
    shuffled = windows.flip(0).reshape(-1)
    forward = streamed_perplexity(model, token_ids, dynamic_cache, SPEC, progress=False)
    backward = streamed_perplexity(model, shuffled, dynamic_cache, SPEC, progress=False)
    assert backward.mean_nll == pytest.approx(forward.mean_nll, rel=1e-9)
    assert backward.num_scored == forward.num_scored


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window_tokens": 1}, "window_tokens"),
        ({"num_windows": 0}, "num_windows"),
        ({"prefill_tokens": 0}, "prefill_tokens"),
        ({"window_tokens": 16, "prefill_tokens": 32}, "prefill_tokens"),
        ({"chunk_tokens": -4}, "chunk_tokens"),
        ({"chunk_tokens": 2.5}, "chunk_tokens"),
        ({"score_second_half": "yes"}, "score_second_half"),
    ],
)
def test_bad_spec_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        StreamSpec(**kwargs)


def test_text_too_short_names_the_field_and_count(model) -> None:
    with pytest.raises(ValueError, match=r"num_windows=2.*only 50"):
        streamed_perplexity(model, torch.zeros(50, dtype=torch.long), dynamic_cache, SPEC, progress=False)


@pytest.mark.parametrize("window_tokens", [64, 65])
def test_score_second_half_counts(model, token_ids, window_tokens) -> None:
    spec = StreamSpec(
        window_tokens=window_tokens, num_windows=2, prefill_tokens=40, chunk_tokens=7, score_second_half=True
    )
    expected = window_tokens - window_tokens // 2
    assert spec.num_scored_per_window == expected
    logprobs, _ = streamed_logprobs(model, token_ids, dynamic_cache, spec, progress=False)
    assert logprobs.shape == (2, expected)
    full_spec = StreamSpec(window_tokens=window_tokens, num_windows=2, prefill_tokens=40, chunk_tokens=7)
    all_logprobs, _ = streamed_logprobs(model, token_ids, dynamic_cache, full_spec, progress=False)
    torch.testing.assert_close(logprobs, all_logprobs[:, -expected:])
    result = full_sequence_perplexity(model, token_ids, spec, progress=False)
    assert result.num_scored == 2 * expected
    assert result.mean_nll == pytest.approx(-logprobs.mean().item(), rel=1e-4)
    assert math.isfinite(result.ppl_stderr)


def test_load_text_missing_or_empty(tmp_path) -> None:
    with pytest.raises(ValueError, match="text_file"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="text_file"):
        load_text(empty)
    full = tmp_path / "full.txt"
    full.write_bytes(b"a b\r\nc\r\n")
    assert load_text(full) == "a b\nc\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tokenize_long_text_without_special_tokens_or_warning() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "a": 2, "b": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", model_max_length=8)
    records = _Records()
    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_logger.addHandler(records)
    try:
        ids = tokenize_text(tokenizer, "a b " * 20)
    finally:
        transformers_logger.removeHandler(records)
    assert ids.dtype == torch.long and ids.shape == (40,)
    assert ids[:4].tolist() == [2, 3, 2, 3]
    assert not any("longer than the specified maximum" in message for message in records.messages)
