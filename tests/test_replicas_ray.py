"""Engine replicas on a local Ray cluster (2 CPUs, no dashboard, a small object store): two replicas
of the tiny random Llama behind one Serve endpoint on 127.0.0.1, driven with the official openai
client and httpx: answers equal to one engine's, prefix affinity (same first blocks -> same replica,
cached tokens), bad input refused through the ingress, and a replica killed in the middle of a
bounded load: every request completes or gets a clear error, none hangs, the endpoint recovers.

Skipped without the ray extra (``pip install 'kvsqueeze[ray]'``); every wait is bounded.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import ray  # noqa: E402
from test_serve_harness import TINY_NAME, tiny_engine  # noqa: E402

from kvsqueeze.serve.replicas import EngineSpec, ReplicaConfig  # noqa: E402
from kvsqueeze.serve.replicas.app import start, stop, wait_running  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]
WAIT = 60  # seconds any request may take at most
START_SECONDS = 300
PREFIX = "The quick brown fox jumps over the lazy dog. " * 6  # 270 chars: > sinks + 4 blocks of 64
REPLICA = "x-kvsqueeze-replica"
TOKENS = 200  # per request of the kill test: long enough for the kill to land mid-answer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    """Two replicas of the tiny engine (`test_serve_harness.tiny_engine`, importable by the workers
    through PYTHONPATH) on a local Ray cluster that is shut down afterwards."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([old] if old else [])])
    config = ReplicaConfig(
        engine=EngineSpec("test_serve_harness:tiny_engine", {"kv": "k4v4"}),
        num_replicas=2,
        timeout_s=WAIT,
        retries=1,
        health_check_period_s=1.0,
        health_check_timeout_s=10.0,
    )
    try:
        yield start(
            config, port=_free_port(), num_cpus=2, object_store_bytes=80 * 2**20, wait_s=START_SECONDS
        )
    finally:
        stop()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)


def offline(prompt: str, max_tokens: int) -> str:
    """A greedy run of a fresh engine in this process (the replicas' model is the same seeded one)."""
    from kvsqueeze.engine import SamplingParams

    engine = tiny_engine("k4v4")
    engine.add_request("solo", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    text = ""
    while engine.has_unfinished_requests():
        text += "".join(out.new_text for out in engine.step())
    return text


def post(url: str, prompt: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT)


def test_openai_client_through_the_endpoint(url, client):
    assert [m.id for m in client.models.list().data] == [TINY_NAME]
    assert httpx.get(f"{url}/health", timeout=WAIT).json() == {"status": "ok"}
    expected = offline(PREFIX, 12)
    out = client.completions.create(model=TINY_NAME, prompt=PREFIX, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and out.usage.completion_tokens == 12
    messages = [{"role": "user", "content": PREFIX}]
    whole = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=TINY_NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 10


def test_bad_input_is_the_replicas_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=TINY_NAME, prompt=PREFIX, max_tokens=4, temperature=7)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PREFIX, max_tokens=4)
    huge = httpx.post(f"{client.base_url}completions", content=b"x" * (8 * 2**20 + 1), timeout=WAIT)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_same_prefix_same_replica_and_its_cache(url):
    answers = [post(url, PREFIX + f" turn {i}?") for i in range(4)]
    assert all(a.status_code == 200 for a in answers)
    assert len({a.headers[REPLICA] for a in answers}) == 1
    cached = [a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert all(c >= 4 + 4 * 64 for c in cached[1:]), cached  # sinks + the 4 keyed blocks at least
    spread = collections.Counter(post(url, chr(65 + i) * 80).headers[REPLICA] for i in range(16))
    assert len(spread) == 2, spread  # 16 distinct prefixes on one replica: probability 2**-15


def _replica_actor(replica_id: str):
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named["name"].startswith("SERVE_REPLICA::") and named["name"].endswith(f"#{replica_id}"):
            return ray.get_actor(named["name"], namespace=named["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def test_replica_killed_under_load_fails_cleanly_and_recovers(url, client):
    victim = post(url, PREFIX + " who?").headers[REPLICA]  # PREFIX's replica: where the load goes
    outcomes: list[str] = []
    in_flight: list[str] = []  # the killer's own stream, mid-answer when the replica is killed
    lock = threading.Lock()
    done = threading.Event()

    def one(i: int) -> str:
        prompt = PREFIX + f" question {i}" if i % 3 else chr(65 + i % 26) * 90  # mostly the victim's prefix
        try:
            if i % 2:
                stream = client.completions.create(
                    model=TINY_NAME, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True
                )
                text = "".join(c.choices[0].text for c in stream if c.choices)
                outcome = "ok" if text else "empty"
            else:
                raw = client.completions.with_raw_response.create(
                    model=TINY_NAME, prompt=prompt, max_tokens=TOKENS, temperature=0
                )
                out = raw.parse()
                outcome = "ok" if out.usage.completion_tokens == TOKENS else "short"
                outcome += " retried" if raw.headers.get("x-kvsqueeze-retries") else ""
        except openai.APITimeoutError:
            outcome = "timeout"
        except openai.APIStatusError as err:
            outcome = f"status {err.status_code} {(err.body or {}).get('code')}"
        except openai.APIError as err:  # an error event in a stream
            outcome = f"stream error {(err.body or {}).get('code') if isinstance(err.body, dict) else err}"
        with lock:
            outcomes.append(outcome)
        return outcome

    def killer() -> None:
        end = time.monotonic() + WAIT
        while len(outcomes) < 2 and time.monotonic() < end:  # some done, more in flight
            time.sleep(0.05)
        # a stream of the victim's prefix, killed once it is mid-answer: the kill surely reaches a
        # request in flight (the load's own requests may all have finished, or not begun, by then)
        stream = client.completions.create(
            model=TINY_NAME, prompt=PREFIX + " last?", max_tokens=600, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        ray.kill(_replica_actor(victim), no_restart=True)
        done.set()
        try:
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            outcome = "ok" if text else "empty"
        except openai.APIError as err:  # the error event that ends a stream cut midway
            outcome = f"stream error {(err.body or {}).get('code') if isinstance(err.body, dict) else err}"
        with lock:
            outcomes.append(outcome)
            in_flight.append(outcome)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(24)))
    thread.join(WAIT)
    assert done.is_set(), "the replica was not killed during the load"
    assert time.monotonic() - started < 4 * WAIT
    counts = collections.Counter(results)
    assert "timeout" not in counts and "empty" not in counts and "short" not in counts, counts
    clear = {"ok", "ok retried", "status 503 replica_unavailable", "stream error replica_unavailable"}
    assert set(counts) <= clear, counts
    assert counts["ok"] + counts["ok retried"] >= 12, counts
    assert in_flight == ["stream error replica_unavailable"], in_flight  # cut midway: a clear error event
    wait_running(2, START_SECONDS)  # Serve replaced the killed replica
    answer = post(url, PREFIX + " after?")
    assert answer.status_code == 200 and answer.headers[REPLICA] != victim
    assert httpx.get(f"{url}/health", timeout=WAIT).status_code == 200
