"""`kvsqueeze serve` end to end on the embedded SmolLM2-135M-Instruct: real answers through the chat
template, streaming equal to the whole answer, prefix-cache hits across requests sharing a system
prompt, and greedy answers under concurrency equal to the same server's answers one at a time."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve_harness import metric_value, serving

from kvsqueeze.engine import LLMEngine

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]
QUESTIONS = (
    "What is the capital of France?", "Name a primary colour.", "What is 2+2?", "Who wrote Hamlet?",
    "What is the boiling point of water in Celsius?", "Name a planet of the solar system.",
    "What language is spoken in Brazil?", "How many legs does a spider have?",
)  # fmt: skip
MODEL = "smollm2-135m"


def ask(client, question: str, max_tokens: int = 24, system: str | None = None, **kwargs):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs
    )


@pytest.fixture(scope="module")
def k4v4_server():
    with serving(LLMEngine.from_pretrained(MODEL, kv="k4v4", kv_budget="128MiB")) as server:
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=300)


def test_chat_answers_streams_and_counts(k4v4_server):
    client = _client(k4v4_server)
    whole = ask(client, QUESTIONS[0])
    assert "Paris" in whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"  # the model's end of turn, before 24 tokens
    tokenizer = k4v4_server.async_engine.engine.tokenizer
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, tokenize=False
    )
    assert whole.usage.prompt_tokens == len(tokenizer.encode(template, add_special_tokens=False))
    chunks = list(ask(client, QUESTIONS[0], stream=True, stream_options={"include_usage": True}))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_shared_system_prompt_hits_the_prefix_cache(k4v4_server):
    from kvsqueeze.eval.demo_text import DEMO_DOCUMENT

    client = _client(k4v4_server)
    before = metric_value(k4v4_server.metrics(), "kvsqueeze:prefix_cache_hits_total")
    first = ask(client, "Summarize the report in one sentence.", max_tokens=4, system=DEMO_DOCUMENT)
    second = ask(client, "What is the report about?", max_tokens=4, system=DEMO_DOCUMENT)
    assert first.usage.prompt_tokens > 1000
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1000, cached  # the whole system prompt but its last, partial block
    hits = metric_value(k4v4_server.metrics(), "kvsqueeze:prefix_cache_hits_total") - before
    assert hits == cached + first.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("kv", ["none", "k4v4"])
def test_concurrent_greedy_equals_solo(kv, k4v4_server):
    engine = k4v4_server.async_engine.engine if kv == "k4v4" else None
    context = serving(LLMEngine.from_pretrained(MODEL, kv=kv, kv_budget="256MiB")) if engine is None else None
    server = context.__enter__() if context is not None else k4v4_server
    try:
        client = _client(server)
        solo = [ask(client, q).choices[0].message.content for q in QUESTIONS]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            together = [o.choices[0].message.content for o in pool.map(lambda q: ask(client, q), QUESTIONS)]
        finished = metric_value(server.metrics(), "kvsqueeze:e2e_request_latency_seconds_count")
        assert finished >= 2 * len(QUESTIONS)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    same = sum(a == b for a, b in zip(solo, together, strict=True))
    need = len(QUESTIONS) if kv == "none" else math.ceil(0.95 * len(QUESTIONS))
    assert same >= need, list(zip(solo, together, strict=True))
