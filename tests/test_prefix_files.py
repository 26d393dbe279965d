"""Prefix-block files (`integrations.prefix_files`): a pool's prefix cache saved and loaded into another
pool (entries, free blocks, hits that read the same bits), the engine's save/load, and `kvsqueeze serve
--prompt-cache-dir` (warm start, save at shutdown, refusals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_serve_harness import TINY_NAME, free_port, serving, tiny_engine, wait_healthy
from tiny import prompt_ids, tiny_llama

from kvsqueeze import KVPool, SqueezedCache
from kvsqueeze.cli import main
from kvsqueeze.commands.serve import PREFIX_FILE, warm_prefix_cache
from kvsqueeze.engine import SamplingParams
from kvsqueeze.integrations.prefix_files import load_prefix_blocks, save_prefix_blocks
from kvsqueeze.integrations.prompt_cache import save_prompt_cache
from kvsqueeze.storage.persist import CacheFileError

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The quick brown fox jumps over the lazy dog. " * 7  # 315 characters: blocks leave the window


def _ids(n: int, shared: int, seed: int) -> torch.Tensor:
    tail = torch.randint(1, 128, (1, n - shared), generator=torch.Generator().manual_seed(seed))
    return torch.cat([prompt_ids(shared), tail], dim=1)


def _publish(model, pool: KVPool, ids: torch.Tensor) -> SqueezedCache:
    """A cache on ``pool`` that computed ``ids`` (taking the cached prefix) and published its blocks."""
    cache = SqueezedCache.from_model(model, "k4v4", pool=pool)
    with torch.no_grad():
        model(ids[:, cache.match_prefix(ids) :], cache=cache)
    return cache


def _hit(model, pool: KVPool, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    cache = SqueezedCache.from_model(model, "k4v4", pool=pool)
    held = cache.match_prefix(ids)
    with torch.no_grad():
        logits = model(ids[:, held:], cache=cache).logits
    cache.reset()
    return held, logits


def test_prefix_tree_round_trips_into_another_pool(tmp_path: Path) -> None:
    model = tiny_llama()
    pool = KVPool()
    first = _publish(model, pool, _ids(300, 300, 0))  # 4 blocks
    second = _publish(model, pool, _ids(330, 200, 1))  # shares 3 of them (match_prefix), adds 2
    first.reset()
    second.reset()
    entries = {k: e.tokens for k, e in pool.prefix.entries.items()}
    assert len(entries) == 1 + 4 + 2
    path = tmp_path / "prefixes.safetensors"
    assert save_prefix_blocks(path, pool, model, "k4v4") == 6
    other = KVPool()
    assert load_prefix_blocks(path, other, model) == 6
    assert {k: e.tokens for k, e in other.prefix.entries.items()} == entries
    assert other.num_used == 0 and other.num_free == 2 * 2 * 6  # 2 layers x keys, values x 6 blocks
    for ids in (_ids(330, 200, 1), _ids(310, 300, 0)):
        held, logits = _hit(model, other, ids)
        want_held, want = _hit(model, pool, ids)
        assert held == want_held == {330: 4 + 5 * 64, 310: 4 + 4 * 64}[ids.shape[1]]
        assert torch.equal(logits, want)
    assert load_prefix_blocks(path, other, model, "k4v4") == 0  # every entry is there already
    assert len(other.prefix) == len(entries) and other.num_free == 24


def test_refusals(tmp_path: Path) -> None:
    model = tiny_llama()
    pool = KVPool()
    _publish(model, pool, prompt_ids(300)).reset()
    path = tmp_path / "p.safetensors"
    save_prefix_blocks(path, pool, model, "k4v4")
    with pytest.raises(CacheFileError, match=r"another cache config: key\.bits 4 \(this cache: 2\)"):
        load_prefix_blocks(path, KVPool(), model, "k2v2")
    with pytest.raises(CacheFileError, match="another model: weights") as refused:
        load_prefix_blocks(path, KVPool(), tiny_llama(seed=1))
    assert refused.value.reason == "model"
    with pytest.raises(ValueError, match="token policy .* no prefix blocks"):
        save_prefix_blocks(path, pool, model, "knorm-50")
    cache = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        model(prompt_ids(10), cache=cache)
    save_prompt_cache(tmp_path / "c.safetensors", cache, model, prompt_ids(10))
    with pytest.raises(
        CacheFileError, match="holds 'kvsqueeze.prompt_cache'; allowed: 'kvsqueeze.prefix_blocks'"
    ):
        load_prefix_blocks(tmp_path / "c.safetensors", KVPool(), model)


def _run(engine, prompt: str, max_tokens: int = 6) -> tuple[list[int], int]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    ids, cached = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids += out.new_token_ids
            cached = out.cached_tokens
    return ids, cached


def test_engine_warm_start_hits_and_answers_like_a_hit_in_the_first_engine(tmp_path: Path) -> None:
    first = tiny_engine("k4v4")
    _run(first, PROMPT)
    again = _run(first, PROMPT)  # a hit on the first engine's own prefix cache
    path = tmp_path / "engine.safetensors"
    assert first.save_prefix_blocks(path) == 4
    warm = tiny_engine("k4v4")
    assert warm.load_prefix_blocks(path) == 4
    assert _run(warm, PROMPT) == again and again[1] == 4 + 4 * 64
    with pytest.raises(CacheFileError, match="another cache config"):
        tiny_engine("int8").load_prefix_blocks(path)


def test_server_saves_its_prefix_cache_at_shutdown_and_warms_from_it(tmp_path: Path) -> None:
    engine = tiny_engine("k4v4")
    with serving(engine, on_stopped=lambda: engine.save_prefix_blocks(tmp_path / PREFIX_FILE)) as server:
        body = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
    assert (tmp_path / PREFIX_FILE).exists()
    warm = tiny_engine("k4v4")
    assert warm_prefix_cache(warm, tmp_path) == 4
    assert _run(warm, PROMPT, 3)[1] == 4 + 4 * 64
    (tmp_path / "other.safetensors").write_bytes(b"not a prefix file at all")
    with pytest.raises(
        ValueError, match=r"--prompt-cache-dir: prefix blocks file .*other\.safetensors.* is not a"
    ):
        warm_prefix_cache(tiny_engine("k4v4"), tmp_path)


def test_serve_refuses_a_missing_prompt_cache_dir_before_loading(tiny_llama_dir, tmp_path, capsys) -> None:
    try:
        code = main(["serve", "--model", str(tiny_llama_dir), "--prompt-cache-dir", str(tmp_path / "nope")])
    except SystemExit as stop:
        code = stop.code
    err = " ".join(capsys.readouterr().err.split())
    assert (
        code == 2
        and "--prompt-cache-dir: " in err
        and "does not exist; allowed: an existing directory" in err
    )


def test_serve_process_saves_at_sigint_and_warms_from_the_file_next_start(tiny_llama_dir, tmp_path) -> None:
    """The command's wiring: `kvsqueeze serve --prompt-cache-dir` writes the file when stopped by
    SIGINT, and the next start loads it (its log says so) and answers with cached prompt tokens."""
    prompt = "The quick brown fox jumps over the lazy dog, " * 36  # ~360 tokens of the SmolLM2 tokenizer

    def serve_once(log: Path) -> dict:
        with free_port() as sock:
            port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "kvsqueeze.cli", "serve", "--model", str(tiny_llama_dir), "--kv", "k4v4",
                "--kv-budget", "64MiB", "--port", str(port), "--prompt-cache-dir", str(tmp_path)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
            try:
                wait_healthy(process, port, log, 180)
                body = {"model": str(tiny_llama_dir), "prompt": prompt, "max_tokens": 2, "temperature": 0}
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
                process.send_signal(signal.SIGINT)
                assert process.wait(60) in (0, 130), log.read_text()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        return reply

    first = serve_once(tmp_path / "first.log")
    assert (tmp_path / PREFIX_FILE).exists(), (tmp_path / "first.log").read_text()
    second = serve_once(tmp_path / "second.log")
    assert "prefix cache: " in (tmp_path / "second.log").read_text()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 256
