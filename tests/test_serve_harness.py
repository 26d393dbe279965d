"""What the serving tests share (no tests here): a character tokenizer built in code for the tiny
random Llama of `tiny.py` (128 ids, no download), engines over it, a real uvicorn server in a
thread on 127.0.0.1 (a free port), and `assert_idle`: no request left, no KV block held.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import uvicorn  # noqa: E402
from tiny import tiny_llama  # noqa: E402

from kvsqueeze.engine import LLMEngine  # noqa: E402
from kvsqueeze.serve import create_app  # noqa: E402

TINY_NAME = "tiny-llama"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SERVER_START_SECONDS = 30
IDLE_SECONDS = 20


def char_tokenizer() -> Any:
    """One token per character: <pad> 0, <unk> 1, printable ASCII, newline, then Latin-1 letters up
    to the tiny model's 128 ids; no BOS/EOS (a greedy run goes to max_tokens); a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for char in [chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0xC0, 0x100)]:
        if len(vocab) < 128:
            vocab[char] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_engine(kv: str = "k4v4", **kwargs: Any) -> LLMEngine:
    """The real engine over the tiny Llama (1,024 positions) and the character tokenizer."""
    return LLMEngine(tiny_llama(), char_tokenizer(), kv=kv, model_name=TINY_NAME, **kwargs)


def free_port() -> socket.socket:
    """A listening-ready socket bound to a free port of 127.0.0.1 (uvicorn serves on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Server:
    """``app`` served by uvicorn in a thread on 127.0.0.1; ``url`` is its base URL."""

    def __init__(self, app: Any, graceful_seconds: float = 20) -> None:
        self.app = app
        self.sock = free_port()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_seconds
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> Server:
        self.thread.start()
        end = time.monotonic() + SERVER_START_SECONDS
        while not self.server.started:
            assert time.monotonic() < end, "the server did not start"
            assert self.thread.is_alive(), "the server thread died"
            time.sleep(0.02)
        return self

    def stop(self, wait: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(wait)
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def async_engine(self) -> Any:
        return self.app.state.async_engine

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@contextlib.contextmanager
def serving(engine: LLMEngine, **app_kwargs: Any) -> Iterator[Server]:
    """A started server over ``engine``; stopped (and checked idle) on exit."""
    server = Server(create_app(engine, **app_kwargs)).start()
    try:
        yield server
        assert_idle(server)
    finally:
        server.stop()


def assert_idle(server: Server, seconds: float = IDLE_SECONDS) -> None:
    """Every request finished and every KV block back in the pool's free list (no leak): read from
    the engine thread's latest stats snapshot, waiting up to ``seconds`` for aborts to land."""
    end = time.monotonic() + seconds
    while True:
        stats = server.async_engine.stats
        idle = (
            server.async_engine.num_unfinished == 0
            and stats.num_running == 0
            and stats.num_waiting == 0
            and stats.free_blocks == stats.total_blocks
            and stats.kv_cache_bytes == 0
            and not server.async_engine.engine.sequences
        )
        if idle:
            return
        assert time.monotonic() < end, f"not idle after {seconds}s: {stats}"
        time.sleep(0.05)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` (with at least these ``labels``) in a /metrics text."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        rest = head[len(name) :]
        if rest and not rest.startswith("{"):
            continue
        if all(f'{key}="{val}"' in rest for key, val in labels.items()):
            return float(value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def wait_healthy(process: Any, port: int, log: Any, seconds: float) -> None:
    """Wait until the server subprocess ``process`` answers /health on 127.0.0.1:``port`` with 200;
    fail with its ``log`` (a Path) when it exits or ``seconds`` pass first."""
    end = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < end, "the server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
