"""`kvsqueeze serve` over the real engine and the tiny random Llama: a uvicorn server on 127.0.0.1,
driven with the official openai client (streaming and not) and raw httpx for malformed input.

After every test that uses the shared server, every request has finished and every KV block is
back in the pool (`assert_idle`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_serve_harness import TINY_NAME, assert_idle, metric_value, serving, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = "The quick brown fox jumps over the lazy dog. " * 7  # 315 tokens: blocks leave the window
NAMES = (
    "kvsqueeze:time_to_first_token_seconds", "kvsqueeze:inter_token_latency_seconds",
    "kvsqueeze:e2e_request_latency_seconds", "kvsqueeze:num_requests_running",
    "kvsqueeze:num_requests_waiting", "kvsqueeze:kv_cache_usage_perc", "kvsqueeze:kv_cache_bytes",
    "kvsqueeze:prefix_cache_queries_total", "kvsqueeze:prefix_cache_hits_total",
    "kvsqueeze:num_preemptions_total", "kvsqueeze:prompt_tokens_total",
    "kvsqueeze:generation_tokens_total", "kvsqueeze:request_success_total",
)  # fmt: skip
WAIT = 30  # seconds any wait in these tests may take at most


@pytest.fixture(scope="module")
def server():
    with serving(tiny_engine("k4v4")) as running:
        yield running


@pytest.fixture
def client(server):
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
    assert_idle(server)


def offline(
    prompt: str, max_tokens: int, kv: str = "k4v4", repeat: int = 1, **params
) -> tuple[str, list[int]]:
    """Text and token ids of a greedy run of a fresh engine, no server; ``repeat`` 2: of the second
    of two runs of the prompt, which takes the first's blocks from the prefix cache (a quantized cache
    then reads those tokens packed where the first run read part of them exact: its tokens may differ)."""
    from kvsqueeze.engine import SamplingParams

    engine = tiny_engine(kv)
    for run in range(repeat):
        engine.add_request(
            f"solo{run}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **params)
        )
        text, ids = "", []
        for _ in range(10 * max_tokens):
            for out in engine.step():
                text, ids = text + out.new_text, ids + out.new_token_ids
            if not engine.has_unfinished_requests():
                break
        else:
            raise AssertionError("the offline run did not finish")
    return text, ids


def engine_generated(server) -> int:
    """Tokens the engine itself generated so far (aborted requests included, unlike the metrics)."""
    return server.async_engine.stats.generation_tokens


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=WAIT, **kwargs)


# ---- answers ------------------------------------------------------------------------------------


def test_completion_is_the_engines_greedy_output_with_usage(client):
    expected, _ = offline(LONG, 24)
    out = client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=24, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (315, 24, 339)
    assert out.model == TINY_NAME and out.object == "text_completion"


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=TINY_NAME, prompt=LONG, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == 315
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt ran just before


def test_completion_token_ids_prompt(client):
    ids = [5 + i % 90 for i in range(150)]
    out = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert out.usage.prompt_tokens == 150 and out.usage.completion_tokens == 5


def test_chat_stream_equals_whole_and_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG}]
    template = f"<system>Be brief.\n<user>{LONG}\n<assistant>"
    expected, _ = offline(template, 16)
    whole = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(template) and whole.usage.completion_tokens == 16
    stream = client.chat.completions.create(
        model=TINY_NAME, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    again, _ = offline(template, 16, repeat=2)  # the stream takes the first request's blocks
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == again
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == len(template) and chunks[-1].usage.completion_tokens == 16


def test_chat_without_max_tokens_fills_the_context(client, server):
    # the tiny model has 1,024 positions: what fits after the prompt is generated
    content = "x" * 980
    out = client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": content}])
    prompt = len(f"<user>{content}\n<assistant>")
    assert out.usage.prompt_tokens == prompt and out.usage.completion_tokens == 1024 - prompt
    assert out.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_output(client):
    text = (
        client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=30, temperature=0).choices[0].text
    )
    stop = text[10:12]
    out = client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    def run():
        return (
            client.completions.create(
                model=TINY_NAME, prompt=LONG, max_tokens=12, temperature=1.0, top_p=0.9, seed=7
            )
            .choices[0]
            .text
        )

    assert run() == run()


@pytest.mark.parametrize("kv", ["none", "k4v4"])
def test_concurrent_greedy_equals_solo(kv):
    prompts = [LONG[i * 7 :] + f" request {i}." for i in range(6)]
    solo = [offline(prompt, 24, kv)[0] for prompt in prompts]
    with serving(tiny_engine(kv)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=WAIT)

        def run(prompt):
            return client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=24, temperature=0)

        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(run, prompts))
        ran_together = metric_value(server.metrics(), "kvsqueeze:e2e_request_latency_seconds_count")
    assert ran_together == 6
    same = sum(o.choices[0].text == text for o, text in zip(outs, solo, strict=True))
    # exact: always; packed: batching changes rounding, near-ties of the random model may flip
    assert same == 6 if kv == "none" else same >= 5, [o.choices[0].text for o in outs]


def test_models_lists_the_served_name(client, server):
    assert [m.id for m in client.models.list().data] == [TINY_NAME]
    assert client.models.retrieve(TINY_NAME).id == TINY_NAME
    missing = httpx.get(f"{server.url}/v1/models/other", timeout=WAIT)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert httpx.get(f"{server.url}/health", timeout=WAIT).json() == {"status": "ok"}


# ---- refusals ---------------------------------------------------------------------------------

COMPLETION = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
BAD = [
    # (path, body, param, code or None)
    ("/v1/completions", b"{not json", None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", None, None),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, "max_tokens", None),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature", None),
    ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream", None),
    ("/v1/completions", {"model": TINY_NAME}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [500]}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, "temperature", None),
    ("/v1/completions", {**COMPLETION, "temperature": -0.1}, "temperature", None),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p", None),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p", None),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", {**COMPLETION, "n": 2}, "n", None),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty", None),
    ("/v1/completions", {**COMPLETION, "max_token": 5}, "max_token", None),
    ("/v1/completions", {**COMPLETION, "logprobs": 2}, "logprobs", None),
    ("/v1/completions", {**COMPLETION, "echo": True}, "echo", None),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options", None),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 1100}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 1000, "max_tokens": 100}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages[0]", None),
    ("/v1/chat/completions", {**CHAT, "messages": "Hello"}, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages[0].content", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 1100}]}, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1010}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", None),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format", None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD, ids=[f"{b[0][4:]}-{b[2]}" for b in BAD])
def test_bad_request_is_400_naming_the_field(server, path, body, param, code):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param is not None:
        assert error["message"].startswith(f"{param}:"), error["message"]
    if code is not None:
        assert error["code"] == code
    assert_idle(server)


def test_openai_client_sees_the_refusals(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_NAME, messages=CHAT["messages"], temperature=3)
    assert refused.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert unknown.value.body["param"] == "model" and "tiny-llama" in unknown.value.body["message"]


def test_unknown_path_and_method_are_openai_shaped(server):
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=WAIT)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{server.url}/v1/completions", timeout=WAIT)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_body_over_the_limit_is_413():
    with serving(tiny_engine("k4v4"), max_body_bytes=2000) as server:
        response = post(server, "/v1/completions", {**COMPLETION, "prompt": "x" * 3000})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        assert post(server, "/v1/completions", COMPLETION).status_code == 200


def test_api_key_is_required_on_v1_only():
    with serving(tiny_engine("k4v4"), api_key="s3cret") as server:
        for key in ("wrong", "s3cret-and-more", "s3cre"):
            bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=WAIT)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=TINY_NAME, prompt="Hi", max_tokens=2)
        anonymous = post(server, "/v1/completions", COMPLETION)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models", timeout=WAIT).status_code == 401
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0, timeout=WAIT)
        assert (
            good.completions.create(model=TINY_NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        )
        assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200  # open by design
        assert httpx.get(f"{server.url}/metrics", timeout=WAIT).status_code == 200


# ---- load, disconnects, timeouts, failures, shutdown ------------------------------------------


def _wait(condition, what: str) -> None:
    end = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _stream(server, body: dict) -> tuple[httpx.Client, httpx.Response]:
    """An open SSE response of ``body`` (close it to leave)."""
    session = httpx.Client(timeout=WAIT)
    request = session.build_request("POST", f"{server.url}/v1/completions", json={**body, "stream": True})
    return session, session.send(request, stream=True)


def test_full_waiting_queue_answers_429_with_retry_after():
    # one sequence runs at a time, one may wait: the third request is refused
    with serving(tiny_engine("k4v4", max_num_seqs=1), max_waiting=1) as server:
        body = {"model": TINY_NAME, "prompt": "Hi", "max_tokens": 1000}
        generated = engine_generated(server)
        first_session, first = _stream(server, body)
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")  # running
        second_session, second = _stream(server, body)
        assert second.status_code == 200
        _wait(lambda: server.async_engine.num_waiting == 1, "the second request to wait")
        assert metric_value(server.metrics(), "kvsqueeze:num_requests_waiting") == 1
        refused = post(server, "/v1/completions", body)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0).completions.create(**body)
        for session, response in ((first_session, first), (second_session, second)):
            response.close()
            session.close()
        assert_idle(server)
        assert metric_value(server.metrics(), "kvsqueeze:request_success_total", finished_reason="abort") == 2
        assert engine_generated(server) - generated < 1000  # both stopped early in the engine


def test_client_leaving_a_stream_frees_its_blocks(client, server):
    aborted = metric_value(server.metrics(), "kvsqueeze:request_success_total", finished_reason="abort")
    generated = engine_generated(server)
    session, response = _stream(server, {"model": TINY_NAME, "prompt": LONG, "max_tokens": 600})
    lines = [line for line, _ in zip(response.iter_lines(), range(6), strict=False)]
    assert all(line.startswith("data: ") for line in lines if line)
    assert server.async_engine.stats.kv_cache_bytes > 0 and server.async_engine.stats.num_running == 1
    assert server.async_engine.stats.free_blocks < server.async_engine.stats.total_blocks
    response.close()
    session.close()
    assert_idle(server)
    now = metric_value(server.metrics(), "kvsqueeze:request_success_total", finished_reason="abort")
    assert now == aborted + 1
    assert engine_generated(server) - generated < 600  # stopped in the engine, not run to the end


def test_client_leaving_a_whole_request_frees_its_blocks(client, server):
    generated = engine_generated(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json={"model": TINY_NAME, "prompt": LONG, "max_tokens": 700},
            timeout=httpx.Timeout(WAIT, read=0.5),
        )
    assert_idle(server)
    assert engine_generated(server) - generated < 700


def test_request_timeout_aborts_the_request():
    with serving(tiny_engine("k4v4"), request_timeout=0.4) as server:
        body = {"model": TINY_NAME, "prompt": LONG, "max_tokens": 700}
        generated = engine_generated(server)
        whole = post(server, "/v1/completions", body)
        assert whole.status_code == 504 and whole.json()["error"]["type"] == "timeout_error"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=WAIT)
        with pytest.raises(openai.APIError, match="request-timeout"):
            for _ in client.completions.create(**body, stream=True):
                pass
        assert_idle(server)
        assert engine_generated(server) - generated < 700
        assert (
            metric_value(server.metrics(), "kvsqueeze:request_success_total", finished_reason="timeout") == 2
        )
        assert post(server, "/v1/completions", {**body, "max_tokens": 3}).status_code == 200


def test_a_failing_request_fails_alone():
    engine = tiny_engine("k4v4")
    poison = engine.encode("POISON")
    run = engine.runner.run

    def failing_run(seqs, counts, rows):  # a fault injected into the real engine's forward
        if any(seq.prompt_ids[: len(poison)] == poison for seq in seqs):
            raise RuntimeError("injected fault")
        return run(seqs, counts, rows)

    engine.runner.run = failing_run
    prompts = ["POISON " + LONG, LONG, "Another prompt. " * 10]
    solo = [offline(prompt, 16)[0] for prompt in prompts[1:]]
    with serving(engine) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=WAIT)

        def complete(prompt):
            try:
                return client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=16, temperature=0)
            except openai.APIError as err:
                return err

        with ThreadPoolExecutor(3) as pool:
            failed, *fine = pool.map(complete, prompts)
        assert isinstance(failed, openai.InternalServerError) and "injected fault" in failed.message
        assert [out.choices[0].text for out in fine] == solo
        assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200
        assert metric_value(server.metrics(), "kvsqueeze:request_success_total", finished_reason="error") == 1


def test_an_engine_step_exception_fails_its_requests_and_the_server_goes_on():
    engine = tiny_engine("k4v4")
    step, calls = engine.step, []

    def step_once_failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected step fault")
        return step()

    engine.step = step_once_failing
    with serving(engine) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=WAIT)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=16, temperature=0)
        out = client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=16, temperature=0)
        assert out.choices[0].text == offline(LONG, 16)[0]


def test_metrics_have_the_names_and_count_requests(client, server):
    before = server.metrics()
    out = client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=9, temperature=0)
    text = server.metrics()
    for name in NAMES:
        assert f"# TYPE {name} " in text, name
    types = [line for line in text.splitlines() if line.startswith("# TYPE kvsqueeze:")]
    assert len([line for line in types if "_created " not in line]) == len(NAMES)

    def delta(name, **labels):
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert delta("kvsqueeze:prompt_tokens_total") == out.usage.prompt_tokens == 315
    assert delta("kvsqueeze:generation_tokens_total") == 9
    assert delta("kvsqueeze:request_success_total", finished_reason="length") == 1
    assert delta("kvsqueeze:time_to_first_token_seconds_count") == 1
    assert delta("kvsqueeze:inter_token_latency_seconds_count") == 8
    assert delta("kvsqueeze:e2e_request_latency_seconds_count") == 1
    assert delta("kvsqueeze:prefix_cache_queries_total") == 315
    assert delta("kvsqueeze:prefix_cache_hits_total") == out.usage.prompt_tokens_details.cached_tokens
    assert metric_value(text, "kvsqueeze:num_requests_running") == 0


def test_graceful_shutdown_drains_running_requests():
    server_cm = serving(tiny_engine("k4v4"))
    server = server_cm.__enter__()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=WAIT)
    started, chunks = threading.Event(), []

    def consume():
        for chunk in client.completions.create(model=TINY_NAME, prompt=LONG, max_tokens=200, stream=True):
            chunks.append(chunk)
            started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(WAIT)
    server.server.should_exit = True  # what SIGINT / SIGTERM do
    reader.join(WAIT)
    assert not reader.is_alive()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) <= 200
    server.thread.join(WAIT)
    assert not server.thread.is_alive() and not server.async_engine.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    assert not server.async_engine.engine.has_unfinished_requests()


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_logged_only_when_asked(log_prompts, caplog):
    secret = "my-private-prompt-1234"
    with (
        caplog.at_level(logging.INFO, logger="kvsqueeze.serve"),
        serving(tiny_engine("k4v4"), log_prompts=log_prompts) as server,
    ):
        post(server, "/v1/completions", {**COMPLETION, "prompt": secret})
        post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": secret}]})
    logged = [record.getMessage() for record in caplog.records if record.name == "kvsqueeze.serve"]
    assert any("prompt tokens" in line for line in logged)
    assert any(secret in line for line in logged) == log_prompts


def test_text_prompts_are_counted_before_they_are_queued(caplog):
    """A text prompt is tokenized by the request handler: the log gives its length, and a prompt
    longer than the context is refused (400) before it reaches the engine's queue."""
    with (
        caplog.at_level(logging.INFO, logger="kvsqueeze.serve"),
        serving(tiny_engine("k4v4")) as server,
    ):
        post(server, "/v1/completions", {**COMPLETION, "prompt": "abcdefg"})  # 7 characters = 7 tokens
        refused = post(server, "/v1/completions", {**COMPLETION, "prompt": "x" * 1100})
        empty = post(server, "/v1/completions", {**COMPLETION, "prompt": ""})
    logged = [record.getMessage() for record in caplog.records if record.name == "kvsqueeze.serve"]
    assert any(": 7 prompt tokens" in line for line in logged)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    assert "1100 prompt tokens" in refused.json()["error"]["message"]
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("budget", [None, 2**17])
def test_models_report_the_longest_sequence_the_budget_holds(budget):
    engine = tiny_engine("k4v4", kv_budget=budget)
    room = min(engine.max_model_len, engine.max_sequence_tokens())
    assert (room < engine.max_model_len) == (budget is not None)
    with serving(engine) as server:
        listed = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        one = httpx.get(f"{server.url}/v1/models/{TINY_NAME}").json()
        too_long = post(server, "/v1/completions", {**COMPLETION, "prompt": "y" * room})
    assert listed["max_model_len"] == one["max_model_len"] == room
    assert too_long.status_code == 400
    message = too_long.json()["error"]["message"]
    assert ("KV budget" in message) == (budget is not None), message


def _burst(server, body: dict, n: int) -> list[int]:
    """Open ``n`` streams of ``body`` at once, close them; their status codes, sorted."""
    with ThreadPoolExecutor(n) as pool:
        opened = list(pool.map(lambda _: _stream(server, body), range(n)))
    for session, response in opened:
        response.close()
        session.close()
    return sorted(response.status_code for _, response in opened)


def test_a_burst_into_an_idle_server_fills_free_slots_before_the_queue():
    """max_num_seqs 1, max_waiting 1, four requests at once into an idle server: one runs, one waits,
    two get 429 — the request that takes the free running slot is not counted as waiting."""
    with serving(tiny_engine("k4v4", max_num_seqs=1), max_waiting=1) as server:
        body = {"model": TINY_NAME, "prompt": "Hi", "max_tokens": 1000}
        codes = _burst(server, body, 4)
        assert codes == [200, 200, 429, 429], codes
        assert_idle(server)


def test_a_burst_counts_free_slots_by_the_kv_budget():
    """Running slots are bounded by the KV budget as well as max_num_seqs: with room for about one
    sequence of the prompts seen so far, a burst of four gets one running, one waiting (max_waiting
    1) and two 429s, although max_num_seqs would allow 256."""
    prompt = "The quick brown fox jumps over"  # ~30 tokens of the character tokenizer
    probe = tiny_engine("k4v4")
    n = len(probe.encode(prompt))
    budget = int(1.2 * probe.peak(n + 12))
    engine = tiny_engine("k4v4", kv_budget=budget)
    with serving(engine, max_waiting=1) as server:
        warm = post(server, "/v1/completions", {"model": TINY_NAME, "prompt": prompt, "max_tokens": 2})
        assert warm.status_code == 200, warm.text
        assert engine.free_slots() == 1  # a second sequence of this prompt's length would not fit
        body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 12}
        codes = _burst(server, body, 4)
        assert codes == [200, 200, 429, 429], codes
        assert_idle(server)
