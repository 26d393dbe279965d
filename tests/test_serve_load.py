"""benchmarks/serve_load.py and its llama.cpp peer, without starting a server: the options, the
server's command line, what its start-up log says, the probe's answer and the skip paths."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The lines llama-cpp-python 0.3.36 prints while it starts with --type_k 2 --type_v 2 --flash_attn true.
LOG = """\
print_info: EOG token             = 0 '<|endoftext|>'
print_info: EOG token             = 2 '<|im_end|>'
print_info: EOG token             = 4 '<reponame>'
load_tensors:          AMX model buffer size =    95.34 MiB
load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
llama_context: flash_attn            = enabled
llama_kv_cache: size =   50.62 MiB (  8192 cells,  30 layers,  1/1 seqs), K (q4_0):   25.31 MiB, V (q4_0):   25.31 MiB
"""


@pytest.fixture(scope="module")
def bench():
    """The two scripts as modules, imported from their folder as they import each other when run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("serve_load"), importlib.import_module("llama_cpp_peer")


def test_options_default_to_no_llama_cpp_and_keep_the_others(bench):
    serve_load, _ = bench
    args = serve_load.parse_args([])
    assert args.llama_cpp_python is None
    assert args.llama_cpp_threads == (os.cpu_count() or 1)
    assert (args.peer, args.presets, args.concurrencies) == (
        "transformers-serve",
        ["none", "int8", "k4v4", "best-4bit"],
        [4, 16],
    )


def test_options_take_the_llama_cpp_interpreter_and_threads(bench):
    serve_load, _ = bench
    args = serve_load.parse_args(
        ["--peer", "none", "--llama-cpp-python", "/opt/lcpp/bin/python", "--llama-cpp-threads", "1"]
    )
    assert (args.peer, args.llama_cpp_python, args.llama_cpp_threads) == ("none", "/opt/lcpp/bin/python", 1)


def test_options_refuse_zero_llama_cpp_threads(bench, capsys):
    serve_load, _ = bench
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--llama-cpp-threads", "0"])
    assert "--llama-cpp-threads: 0 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("repack", [True, False])
def test_server_command_line(bench, repack):
    _, peer = bench
    argv = peer.server_argv("/opt/lcpp/bin/python", Path("/m/model.gguf"), 4321, 8192, 2, repack, "llama-cpp")
    split = argv.index("--")
    script = str(BENCHMARKS / "llama_cpp_peer.py")
    no_repack = [] if repack else ["--no-repack"]
    assert argv[:split] == ["/opt/lcpp/bin/python", "-I", "-u", script, "serve", *no_repack]
    options = dict(zip(argv[split + 1 :: 2], argv[split + 2 :: 2], strict=True))
    assert options == {
        "--model": "/m/model.gguf", "--model_alias": "llama-cpp", "--host": "127.0.0.1", "--port": "4321",
        "--type_k": "2", "--type_v": "2", "--flash_attn": "true", "--n_ctx": "8192", "--n_threads": "2",
        "--n_threads_batch": "2", "--cache": "false", "--interrupt_requests": "false",
        "--logits_all": "false", "--verbose": "true",
    }  # fmt: skip


def test_the_log_shows_a_q4_0_cache_with_flash_attention(bench):
    _, peer = bench
    found, problem = peer.read_log(LOG)
    assert problem is None
    assert found == {
        "flash_attn": "enabled",
        "eog_tokens": [0, 2, 4],
        "weight_buffers_mib": {"AMX": 95.34, "CPU_Mapped": 92.1},
        "kv_cache": {
            "type_k": "q4_0", "type_v": "q4_0", "mib": 50.62, "k_mib": 25.31, "v_mib": 25.31,
            "cells": 8192, "layers": 30, "seqs": 1,
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    ("log", "problem"),
    [
        (LOG.replace("V (q4_0)", "V (f16)"), "its KV cache is K q4_0 / V f16, not q4_0"),
        (LOG.replace("= enabled", "= disabled"), "flash attention is 'disabled', not 'enabled'"),
        ("\n".join(line for line in LOG.splitlines() if "kv_cache" not in line), "no 'llama_kv_cache: size'"),
    ],
)
def test_the_log_refuses_another_cache(bench, log, problem):
    _, peer = bench
    assert problem in peer.read_log(log)[1]


def test_requests_ban_the_end_of_generation_tokens(bench):
    _, peer = bench
    assert peer.request_extra([0, 2]) == {"repeat_penalty": 1.0, "logit_bias": {"0": -1e9, "2": -1e9}}


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "expected"),
    [
        (0, '{"version": "0.3.36"}\n{"decoded": true}\n', "", ("0.3.36", True, "")),
        (-4, '{"version": "0.3.36"}\n', "", ("0.3.36", False, "killed by SIGILL")),
        (2, '{"error": "/x has no llama_cpp.server"}\n', "", (None, False, "no llama_cpp.server")),
        (1, "", "Traceback ...\nSyntaxError: invalid syntax\n", (None, False, "SyntaxError: invalid syntax")),
    ],
)
def test_the_probe_answer(bench, returncode, stdout, stderr, expected):
    _, peer = bench
    found = peer.read_probe(returncode, stdout, stderr)
    assert (found.version, found.repack) == expected[:2]
    assert expected[2] in found.detail


def test_the_peer_is_skipped_without_an_interpreter(bench):
    serve_load, _ = bench
    found, gguf = serve_load.prepare_llama_cpp(serve_load.parse_args([]))
    assert (found.version, gguf) == (None, None)
    assert found.detail == "no --llama-cpp-python PYTHON given"


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is not None, reason="this interpreter has llama_cpp"
)
def test_the_peer_is_skipped_when_the_interpreter_lacks_llama_cpp(bench, tmp_path):
    serve_load, _ = bench
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    args = serve_load.parse_args(["--model", str(gguf), "--llama-cpp-python", sys.executable])
    found, _ = serve_load.prepare_llama_cpp(args)
    assert found.version is None
    assert found.detail.startswith(f"{sys.executable} has no llama_cpp.server")


def test_the_peer_is_skipped_when_the_interpreter_is_missing(bench, tmp_path):
    _, peer = bench
    found = peer.probe(str(tmp_path / "no-python"), tmp_path / "model.gguf", 1)
    assert found.version is None
    assert "No such file" in found.detail


def test_the_peer_is_skipped_without_a_gguf_file(bench, tmp_path):
    serve_load, _ = bench
    args = serve_load.parse_args(["--model", str(tmp_path), "--llama-cpp-python", sys.executable])
    found, gguf = serve_load.prepare_llama_cpp(args)
    assert (found.version, gguf) == (None, None)
    assert "has no GGUF file" in found.detail
