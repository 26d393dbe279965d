"""`kvsqueeze serve` on the command line: flags refused before the weights load (exit code 2, the
message naming the flag, the value and what is allowed), and a real server process on 127.0.0.1
(the tiny random Llama of conftest.py with the SmolLM2 tokenizer and its chat template) that answers
the openai client, keeps prompts out of its log and exits on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from kvsqueeze.cli import main

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve_harness import wait_healthy  # noqa: E402

START_SECONDS = 180
PROMPT = "Name three colours of the rainbow, please."


def cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--port", "0"], "--port: 0 is not allowed; allowed: an integer from 1 to 65535"),
        (["--port", "70000"], "--port: 70000 is not allowed"),
        (["--host", ""], "--host: '' is empty"),
        (["--max-waiting", "0"], "--max-waiting: 0 is not allowed; allowed: an integer >= 1"),
        (["--max-num-seqs", "-1"], "--max-num-seqs: -1 is not allowed"),
        (["--request-timeout", "0"], "--request-timeout: 0.0 is not allowed; allowed: seconds > 0"),
        (["--drain-timeout", "nan"], "--drain-timeout: nan is not allowed"),
        (["--kv-budget", "12parsecs"], "--kv-budget: '12parsecs' is not a size"),
        (["--kv-budget", "0MiB"], "--kv-budget: '0MiB' must be more than 0 bytes"),
        (["--kv", "nope"], "--kv: preset: 'nope' is unknown"),
        (["--kv-keys", "int5"], "--kv-keys: 'int5' has an unknown type"),
        (["--api-key", " "], "--api-key: it is empty"),
        (["--served-model-name", ""], "--served-model-name: it is empty"),
        (["--host", "no-such-host.invalid"], "--host: 'no-such-host.invalid' does not resolve"),
    ],
)
def test_flags_refused_before_loading(flags, needle, tiny_llama_dir, capsys):
    code, err = cli(["serve", "--model", tiny_llama_dir, *flags], capsys)
    assert code == 2 and needle in err, err


def test_busy_port_refused_before_loading(tiny_llama_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = cli(["serve", "--model", tiny_llama_dir, "--port", port], capsys)
    assert code == 2 and f"--port: 127.0.0.1:{port} cannot be bound" in err, err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_process_answers_and_stops_on_sigint(tiny_llama_dir, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "KVSQUEEZE_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "kvsqueeze.cli", "serve", "--model", str(tiny_llama_dir), "--kv", "k4v4",
            "--kv-budget", "64MiB", "--port", str(port), "--served-model-name", "tiny", "--batch-invariant"]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(process, port, log, START_SECONDS)
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=60
            )
            assert [m.id for m in client.models.list().data] == ["tiny"]
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
            )
            assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens > 10
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
            process.send_signal(signal.SIGINT)
            code = process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    text = log.read_text()
    assert code in (0, 130), text  # uvicorn re-raises the SIGINT it handled: 130, "Ctrl-C"
    assert "batch-invariant GEMMs" in text
    assert "prompt tokens" in text and PROMPT not in text and "rainbow" not in text
