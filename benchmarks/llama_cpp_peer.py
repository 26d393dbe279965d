"""The llama.cpp peer of `serve_load.py`: llama-cpp-python's OpenAI server (``python -m
llama_cpp.server``) on the embedded model's own GGUF file (Q4_1 weights, where the kvsqueeze runs
use its float32 dequantization), with a q4_0 K and V cache (flash attention on: llama.cpp needs it
for a quantized V).

Standard library only, because two interpreters use this file: `serve_load.py` imports the pure
parts (the server's command line, what its log says, the probe's answer), and the interpreter that
has ``llama-cpp-python[server]`` runs it:

    PYTHON llama_cpp_peer.py probe GGUF THREADS           # prints the version, then decodes a token
    PYTHON llama_cpp_peer.py serve [--no-repack] -- ARGS  # python -m llama_cpp.server ARGS

``--no-repack`` is llama.cpp's own name for loading the weights without its extra buffer types
(AMX, CPU repacking), which llama-cpp-python's server does not expose; where the CPU reports AMX
that the machine cannot run (this VM: ``tilezero`` raises SIGILL as soon as a decode has more than
one token), the probe dies and the server starts with ``--no-repack``.

How the server serves is fixed here and saved with the results (`SERVING`).
"""

from __future__ import annotations

import json
import re
import runpy
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

KV_TYPE = "q4_0"
KV_GGML_TYPE = 2  # ggml.h GGML_TYPE_Q4_0: the server's --type_k / --type_v take the enum's int
WEIGHTS = "Q4_1 GGUF"
LABEL = f"llama.cpp {KV_TYPE} KV, {WEIGHTS}, 1 at a time"
NO_EOS_BIAS = -1e9  # added to the end-of-generation logits: the server has no ignore_eos
SERVING = {
    "slots": 1,
    "scheduling": "one request at a time: one model context with one sequence behind a lock; "
    "the others wait, and their TTFT includes the wait",
    "prompt_cache": "off (--cache false); each request reuses the longest prefix it shares with "
    "the previous request still in the context",
    "interrupt_requests": "off: a waiting request does not cut a streaming one short (the default does)",
    "logits_all": "off: logits of the last prompt token only",
    "end_of_sequence": f"the end-of-generation tokens named in the log get a logit bias of {NO_EOS_BIAS:g}",
    "repeat_penalty": 1.0,
}
KV_LINE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/\d+ seqs\),"
    r"\s*K \((\w+)\):\s*([\d.]+) MiB,\s*V \((\w+)\):\s*([\d.]+) MiB"
)
FLASH_LINE = re.compile(r"llama_context: flash_attn\s*=\s*(\w+)")
EOG_LINE = re.compile(r"print_info: EOG token\s*=\s*(\d+)\b")
BUFFER_LINE = re.compile(r"load_tensors:\s*(\S+) model buffer size =\s*([\d.]+) MiB")


@dataclass(frozen=True)
class Probe:
    """What the probe found: ``version`` of llama-cpp-python (None: the peer cannot run, ``detail``
    says why) and whether the weights decode with llama.cpp's repacking buffers."""

    version: str | None
    repack: bool
    detail: str = ""


def probe(python: str, gguf: Path, threads: int, seconds: float = 120) -> Probe:
    """Run ``python llama_cpp_peer.py probe`` (bounded) and read its answer."""
    argv = [python, "-I", str(Path(__file__).resolve()), "probe", str(gguf), str(threads)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds)
    except OSError as err:
        return Probe(None, False, f"{python}: {err.strerror or err}")
    except subprocess.TimeoutExpired:
        return Probe(None, False, f"{python}: the probe took more than {seconds:g} s")
    return read_probe(done.returncode, done.stdout, done.stderr)


def read_probe(returncode: int, stdout: str, stderr: str) -> Probe:
    found: dict = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            found |= json.loads(line)
    if "version" not in found:
        last = (stderr.strip().splitlines() or [f"exit status {returncode}"])[-1]
        return Probe(None, False, found.get("error") or last)
    if found.get("decoded"):
        return Probe(found["version"], True)
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return Probe(found["version"], False, f"decoding with weight repacking failed ({how}): --no-repack")


def server_argv(
    python: str, gguf: Path, port: int, n_ctx: int, threads: int, repack: bool, alias: str
) -> list[str]:
    """The command line of the server on 127.0.0.1:``port``."""
    # -I: nothing of this folder on sys.path; -u: the log as it is written
    argv = [python, "-I", "-u", str(Path(__file__).resolve()), "serve"] + ([] if repack else ["--no-repack"])
    options = {
        "--model": str(gguf), "--model_alias": alias, "--host": "127.0.0.1", "--port": str(port),
        "--type_k": str(KV_GGML_TYPE), "--type_v": str(KV_GGML_TYPE), "--flash_attn": "true",
        "--n_ctx": str(n_ctx), "--n_threads": str(threads), "--n_threads_batch": str(threads),
        "--cache": "false", "--interrupt_requests": "false", "--logits_all": "false", "--verbose": "true",
    }  # fmt: skip
    return argv + ["--"] + [part for pair in options.items() for part in pair]


def read_log(text: str) -> tuple[dict, str | None]:
    """What the server's start-up log says about its KV cache, flash attention, weight buffers and
    end-of-generation tokens, and why the run must be skipped (None: the cache is q4_0 K and V)."""
    found: dict = {
        "flash_attn": _first(FLASH_LINE, text),
        "eog_tokens": sorted({int(t) for t in EOG_LINE.findall(text)}),
        "weight_buffers_mib": {name: float(mib) for name, mib in BUFFER_LINE.findall(text)},
    }
    kv = KV_LINE.search(text)
    if kv is None:
        return found, "its log has no 'llama_kv_cache: size' line"
    mib, cells, layers, seqs, type_k, k_mib, type_v, v_mib = kv.groups()
    found["kv_cache"] = {
        "type_k": type_k, "type_v": type_v, "mib": float(mib), "k_mib": float(k_mib),
        "v_mib": float(v_mib), "cells": int(cells), "layers": int(layers), "seqs": int(seqs),
    }  # fmt: skip
    if (type_k, type_v) != (KV_TYPE, KV_TYPE):
        return found, f"its KV cache is K {type_k} / V {type_v}, not {KV_TYPE}"
    if found["flash_attn"] != "enabled":
        return found, f"flash attention is {found['flash_attn']!r}, not 'enabled'"
    return found, None


def request_extra(eog_tokens: list[int]) -> dict:
    """Fields every request to the server carries: greedy without a repeat penalty, no early end."""
    return {"repeat_penalty": 1.0, "logit_bias": {str(token): NO_EOS_BIAS for token in eog_tokens}}


def _first(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    return match.group(1) if match else None


# ---- run by the interpreter that has llama-cpp-python ---------------------------------------------


def _probe(gguf: str, threads: int) -> None:
    try:
        import llama_cpp
        import llama_cpp.server.app  # noqa: F401 (the [server] extra)
    except ImportError as err:
        print(json.dumps({"error": f"{sys.executable} has no llama_cpp.server ({err})"}))
        sys.exit(2)
    print(json.dumps({"version": llama_cpp.__version__}), flush=True)
    model = llama_cpp.Llama(gguf, n_ctx=256, n_threads=threads, verbose=False)
    model("The history of the city begins. " * 12, max_tokens=2, temperature=0)  # a batch of prompt tokens
    print(json.dumps({"decoded": True}), flush=True)


def _serve(argv: list[str]) -> None:
    split = argv.index("--")
    if "--no-repack" in argv[:split]:
        from llama_cpp import llama_cpp as lib

        defaults = lib.llama_model_default_params

        def without_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_repack  # read by llama_cpp.Llama when it loads
    sys.argv = ["llama_cpp.server", *argv[split + 1 :]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "probe":
        _probe(rest[0], int(rest[1]))
    elif command == "serve":
        _serve(rest)
    else:
        sys.exit(f"{command!r}: expected probe or serve")
