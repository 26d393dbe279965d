"""Passkey / needle prompts (real SmolLM2 tokenizer) and the retrieval loop on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from kvsqueeze.eval.methods import resolve_methods
from kvsqueeze.eval.retrieval import (
    RetrievalSpec,
    evaluate_retrieval,
    is_correct,
    make_needle_prompt,
    make_passkey_prompt,
    random_key,
)
from kvsqueeze.eval.text import tokenize_text
from kvsqueeze.models import resolve_model

DEPTH_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny_model(tiny_llama) -> LlamaForCausalLM:
    return tiny_llama


def _key_text(tokenizer, input_ids: torch.Tensor, span: tuple[int, int]) -> str:
    return tokenizer.decode(input_ids[0, span[0] : span[1]]).strip()


@pytest.mark.parametrize("num_tokens", [1024, 2048, 4000])
@pytest.mark.parametrize("depth", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_passkey_prompt_places_the_key_at_the_depth(tokenizer, num_tokens, depth) -> None:
    input_ids, key, span = make_passkey_prompt(tokenizer, num_tokens, depth, seed=3)
    assert input_ids.shape == (1, num_tokens) and input_ids.dtype == torch.long
    assert _key_text(tokenizer, input_ids, span) == key
    assert abs(span[0] / num_tokens - depth) <= DEPTH_TOLERANCE


@pytest.mark.parametrize("depth", [0.25, 0.5, 0.9])
def test_passkey_prompt_short(tokenizer, depth) -> None:
    input_ids, key, span = make_passkey_prompt(tokenizer, 512, depth, seed=0)
    assert input_ids.shape == (1, 512)
    assert abs(span[0] / 512 - depth) <= DEPTH_TOLERANCE


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_extreme_depths_stay_inside_the_filler(tokenizer, depth) -> None:
    input_ids, key, span = make_passkey_prompt(tokenizer, 1024, depth, seed=1)
    text = tokenizer.decode(input_ids[0])
    assert _key_text(tokenizer, input_ids, span) == key
    intro_end = text.index("important information there.")
    question = text.index("What is the pass key?")
    assert intro_end < text.index(f"The pass key is {key}") < question
    assert text.rstrip().endswith("assistant")


def test_passkey_prompt_is_asked_through_the_chat_template(tokenizer) -> None:
    input_ids, key, _ = make_passkey_prompt(tokenizer, 300, 0.5, seed=7)
    text = tokenizer.decode(input_ids[0])
    assert text.startswith("<|im_start|>system")
    assert "What is the pass key? Answer with the number only.<|im_end|>" in text
    assert text.count(key) == 2 and "The grass is green. The sky is blue." in text


def test_keys_are_five_digits_seeded(tokenizer) -> None:
    keys = [random_key(seed) for seed in range(20)]
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert len(set(keys)) > 15
    first = make_passkey_prompt(tokenizer, 256, 0.5, seed=4)
    again = make_passkey_prompt(tokenizer, 256, 0.5, seed=4)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_prompt_places_the_key_at_the_depth(tokenizer, depth) -> None:
    paragraph = "The city grew along the river . Its port traded salt , wool and iron with the coast . "
    text_ids = tokenize_text(tokenizer, paragraph * 400)
    input_ids, key, span = make_needle_prompt(tokenizer, 2048, depth, seed=5, text_ids=text_ids)
    assert input_ids.shape == (1, 2048)
    assert _key_text(tokenizer, input_ids, span) == key
    assert abs(span[0] / 2048 - depth) <= DEPTH_TOLERANCE
    assert f"The special magic number is {key}." in tokenizer.decode(input_ids[0])


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda tok: make_passkey_prompt(tok, 1024, 1.5, seed=0), "depth=1.5"),
        (lambda tok: make_passkey_prompt(tok, 1024, -0.1, seed=0), "depth=-0.1"),
        (lambda tok: make_passkey_prompt(tok, 40, 0.5, seed=0), "length=40"),
        (lambda tok: make_needle_prompt(tok, 512, 0.5, 0, torch.arange(100)), "haystack"),
    ],
)
def test_bad_prompt_arguments_name_the_field(tokenizer, call, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        call(tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"task": "haystack"}, "task"),
        ({"lengths": ()}, "lengths"),
        ({"lengths": (512, 0)}, "lengths"),
        ({"depths": (0.5, 2.0)}, "depth"),
        ({"depths": (0.5, 0.5)}, "depths"),
        ({"num_seeds": 0}, "num_seeds"),
        ({"new_tokens": 1.5}, "new_tokens"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
    ],
)
def test_bad_spec_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        RetrievalSpec(**kwargs)


@pytest.mark.parametrize(
    ("answer", "correct"),
    [("48213", True), ("The pass key is 48213.", True), ("48 213", True), ("4821", False), ("", False)],
)
def test_is_correct(answer, correct) -> None:
    assert is_correct(answer, "48213") is correct


def test_retrieval_rows_and_reference_paths_agree(tiny_model, tokenizer) -> None:
    methods = resolve_methods("exact,none,k4v4")
    spec = RetrievalSpec(lengths=(300, 400), depths=(0.3, 0.8), num_seeds=2, new_tokens=4, chunk_tokens=64)
    rows = evaluate_retrieval(tiny_model, tokenizer, methods, spec, progress=False)
    assert [(r["method"], r["length"], r["depth"]) for r in rows][:4] == [
        ("exact", 300, 0.3),
        ("exact", 300, 0.8),
        ("exact", 400, 0.3),
        ("exact", 400, 0.8),
    ]
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row["num_trials"] == 2 == len(row["trials"])
        assert row["accuracy"] == row["num_correct"] / 2
        assert abs(row["mean_key_depth"] - row["depth"]) < 0.05

    def answers(rows: list[dict], method: str) -> list[str]:
        return [t["answer"] for r in rows if r["method"] == method for t in r["trials"]]

    assert answers(rows, "none") == answers(rows, "exact")  # the passthrough preset reproduces DynamicCache
    one_shot = RetrievalSpec(
        lengths=(300, 400), depths=(0.3, 0.8), num_seeds=2, new_tokens=4, chunk_tokens=4096
    )
    unchunked = evaluate_retrieval(tiny_model, tokenizer, methods[:1], one_shot, progress=False)
    assert answers(unchunked, "exact") == answers(rows, "exact")  # chunked prefill == one forward


def test_needle_task_needs_a_text(tiny_model, tokenizer) -> None:
    spec = RetrievalSpec(task="needle", lengths=(256,), depths=(0.5,), num_seeds=1)
    with pytest.raises(ValueError, match="text_file"):
        evaluate_retrieval(tiny_model, tokenizer, resolve_methods("exact"), spec, progress=False)


def test_lengths_beyond_the_context_name_the_field(tiny_model, tokenizer) -> None:
    spec = RetrievalSpec(lengths=(4092,), depths=(0.5,), num_seeds=1)
    with pytest.raises(ValueError, match=r"lengths=\[4092\]"):
        evaluate_retrieval(tiny_model, tokenizer, resolve_methods("exact"), spec, progress=False)


def test_token_policy_caches_get_the_prompt_instructions_marked(tiny_model, tokenizer) -> None:
    from kvsqueeze.eval.retrieval import instruction_spans, mark_instructions
    from kvsqueeze.integrations import SqueezedCache
    from kvsqueeze.policies import Role

    (a, b), (c, d) = instruction_spans(tokenizer, "passkey", 300)
    input_ids, _, (key_start, _) = make_passkey_prompt(tokenizer, 300, 0.5, 0)
    assert a == 0 < b < key_start < c < d == 300
    assert "pass key" in tokenizer.decode(input_ids[0, c:d])  # the question is marked
    cache = SqueezedCache.from_model(tiny_model, "k2v2-instruct")
    mark_instructions(cache, tokenizer, "passkey", 300)
    roles = cache.layers[0].store.roles[0]
    assert (roles[:b] == Role.INSTRUCTION).all() and (roles[b:c] == Role.TEXT).all()
    mark_instructions(SqueezedCache.from_model(tiny_model, "k4v4"), tokenizer, "passkey", 300)  # no-op
    rows = evaluate_retrieval(
        tiny_model,
        tokenizer,
        resolve_methods("k2v2-instruct"),
        RetrievalSpec(lengths=(300,), depths=(0.5,), num_seeds=1, new_tokens=2, chunk_tokens=64),
        progress=False,
    )
    assert rows[0]["num_trials"] == 1
