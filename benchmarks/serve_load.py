"""Load test of `kvsqueeze serve` on loopback (issue 14), beside transformers' own continuous batching
and llama.cpp's server on the same model, machine and request mix.

    python benchmarks/serve_load.py [--kv none,int8,k4v4,best-4bit,k4v4:batch-invariant] [--kv-budget 256MiB]
        [--requests 32] [--concurrency 4,16] [--prompt-tokens 512] [--output-tokens 128] [--jitter 0]
        [--malformed 0.1] [--disconnect 0.1] [--beyond-context 0.05]
        [--peer transformers-serve|transformers-batch|none] [--text-file PATH] [--model smollm2-135m]
        [--llama-cpp-python PYTHON] [--llama-cpp-threads N]

For each ``--kv`` preset a `kvsqueeze serve` process starts on 127.0.0.1 (a free port), is warmed up,
then takes ``--requests`` requests at each ``--concurrency`` (that many in flight at once), and
stops. Prompts are WikiText-2 raw test at random offsets (seeded: every server gets the same mix),
``--prompt-tokens`` long (+- ``--jitter`` as a fraction, uniform), asking for ``--output-tokens``
(same jitter) with the end of sequence ignored, so every server generates the same tokens; they
are streamed (SSE) and timed at the client.

The mix may add malformed requests (bad JSON, out-of-range or mistyped fields, an unknown model,
an empty prompt), clients leaving mid-stream, and prompts beyond the model's context: malformed
and too-long requests must get a 4xx, the others must complete, the server must stay up, and after
each run the server must hold no KV bytes and run nothing (read from its /metrics).

Reported per server and concurrency: output tokens/s (generated tokens of completed requests over
the wall time), TTFT p50/p99, inter-token latency p50/p99 (between streamed chunks), errors (any
outcome other than the expected one), peak in-flight requests at the client, and, from /metrics
polled every 0.25 s, peak running sequences, peak KV bytes and preemptions.

Peers: ``transformers-serve`` runs ``transformers serve --continuous-batching`` (paged
full-precision cache) on the same model folder and drives it with the same HTTP load;
``transformers-batch`` calls ``model.generate_batch`` (transformers' continuous-batching API, no
HTTP) on the valid requests of the mix, all submitted at once (TTFT from the request's creation).
With ``--llama-cpp-python PYTHON`` (an interpreter that has ``llama-cpp-python[server]``; without
it, or when it lacks ``llama_cpp.server``, that peer is skipped with the reason) llama.cpp's server
runs too, through `llama_cpp_peer.py`: the model's own GGUF (Q4_1 weights, not the float32 ones the
other runs use) with a q4_0 K and V cache, checked in its log, on ``--llama-cpp-threads`` threads
(default: one per core; its spinning threads slow down sharply when another process takes a core),
serving one request at a time (its row says so; the JSON has its version, KV cache and how it
serves). It takes the same HTTP load, with the end-of-generation tokens banned by a logit bias
instead of ``ignore_eos``; it answers most malformed bodies with 200 or 500, which count as errors.

Every loop is bounded: a request times out after ``--request-timeout`` seconds, a run stops
starting requests after ``--max-seconds``, a server that does not come up in ``--start-timeout``
seconds is skipped. Prints a table, saves JSON (config, environment, every run) and a PNG
(throughput and TTFT p99 vs concurrency), and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import llama_cpp_peer  # beside this script
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 170)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
MALFORMED_BODIES = ("bad-json", "temperature", "type", "unknown-model", "empty-prompt", "n", "unknown-field")
METRICS_PERIOD = 0.25
KVSQUEEZE_NAME = "bench"
LLAMA_CPP_NAME = "llama-cpp"


@dataclass
class Planned:
    """One request of the mix: ``kind`` is valid, malformed, disconnect (leaves after
    ``leave_after`` chunks) or beyond (a prompt beyond the context)."""

    index: int
    kind: str
    prompt: str
    max_tokens: int
    malformed: str = ""
    leave_after: int = 0


@dataclass
class Outcome:
    index: int
    kind: str
    ok: bool
    status: int | None = None
    detail: str = ""
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0


@dataclass
class Target:
    """A server under test: its base URL, the model name it serves, what its requests carry, the path
    that answers 200 once it is up, ``check`` (once up: why the run must be skipped, or None) and
    ``notes`` saved with its rows."""

    name: str
    url: str
    model: str
    extra: dict
    metrics: bool
    process: subprocess.Popen | None = None
    health: str = "/health"
    check: Callable[[], str | None] | None = None
    notes: dict = field(default_factory=dict)


# ---- the request mix ---------------------------------------------------------------------------


def make_mix(args, tokenizer, ids: list[int], context: int) -> list[Planned]:
    rng = random.Random(args.seed)
    kinds = ["valid"] * args.requests
    slots = list(range(args.requests))
    rng.shuffle(slots)
    counts = [("malformed", args.malformed), ("disconnect", args.disconnect), ("beyond", args.beyond_context)]
    for kind, fraction in counts:
        for _ in range(round(fraction * args.requests)):
            if slots:
                kinds[slots.pop()] = kind
    mix = []
    for i, kind in enumerate(kinds):
        length = _jittered(rng, args.prompt_tokens, args.jitter)
        if kind == "beyond":
            length = context + 64
        start = rng.randrange(0, max(1, len(ids) - length))
        prompt = tokenizer.decode(ids[start : start + length])
        out = _jittered(rng, args.output_tokens, args.jitter)
        planned = Planned(i, kind, prompt, out)
        if kind == "malformed":
            planned.malformed = MALFORMED_BODIES[i % len(MALFORMED_BODIES)]
        if kind == "disconnect":
            planned.leave_after = rng.randint(1, max(1, out // 2))
        mix.append(planned)
    return mix


def _jittered(rng: random.Random, value: int, jitter: float) -> int:
    return max(1, round(value * rng.uniform(1 - jitter, 1 + jitter)))


def body(target: Target, planned: Planned, stream: bool = True) -> dict | bytes:
    base = {
        "model": target.model,
        "prompt": planned.prompt,
        "max_tokens": planned.max_tokens,
        "temperature": 0,
    }
    if stream:
        base |= {"stream": True, "stream_options": {"include_usage": True}}
    base |= target.extra
    broken = {
        "bad-json": b'{"model": "x", "prompt": ',
        "temperature": {**base, "temperature": 5},
        "type": {**base, "max_tokens": "many"},
        "unknown-model": {**base, "model": "no-such-model"},
        "empty-prompt": {**base, "prompt": ""},
        "n": {**base, "n": 3},
        "unknown-field": {**base, "max_tokenz": 3},
    }
    return broken[planned.malformed] if planned.kind == "malformed" else base


# ---- one run: the mix at one concurrency ------------------------------------------------------


async def one_request(http: httpx.AsyncClient, target: Target, planned: Planned) -> Outcome:
    url = f"{target.url}/v1/completions"
    outcome = Outcome(planned.index, planned.kind, ok=False)
    start = time.perf_counter()
    try:
        if planned.kind in ("malformed", "beyond"):
            payload = body(target, planned, stream=False)
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            response = await http.post(url, content=content, headers={"content-type": "application/json"})
            outcome.status = response.status_code
            outcome.ok = 400 <= response.status_code < 500
            outcome.detail = response.text[:200]
            return outcome
        async with http.stream("POST", url, json=body(target, planned)) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.detail = (await response.aread()).decode(errors="replace")[:200]
                return outcome
            last, chunks, finished = None, 0, False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.detail = str(event["error"])[:200]
                    return outcome
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if last is None:
                            outcome.ttft = now - start
                        else:
                            outcome.gaps.append(now - last)
                        last = now
                    finished = finished or choice.get("finish_reason") is not None
                if event.get("usage"):
                    outcome.output_tokens = event["usage"]["completion_tokens"]
                if planned.kind == "disconnect" and chunks >= planned.leave_after:
                    outcome.ok = True  # leaving: the response closes with the block
                    return outcome
            outcome.output_tokens = outcome.output_tokens or chunks
            outcome.ok = finished
            outcome.detail = "" if finished else "the stream ended without a finish_reason"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        outcome.detail = f"{type(err).__name__}: {err}"[:200]
    return outcome


async def poll_metrics(target: Target, peaks: dict, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        while not stop.is_set():
            try:
                values = parse_metrics((await http.get(f"{target.url}/metrics")).text)
                peaks["running"] = max(peaks["running"], values.get("kvsqueeze:num_requests_running", 0))
                peaks["kv_bytes"] = max(peaks["kv_bytes"], values.get("kvsqueeze:kv_cache_bytes", 0))
            except httpx.HTTPError:
                pass
            with _suppress_timeout():
                await asyncio.wait_for(stop.wait(), METRICS_PERIOD)


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, trace) -> bool:
        return kind is asyncio.TimeoutError


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value of a /metrics text (labels dropped; the first sample of each name)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values.setdefault(name.split("{")[0], float(value))
    return values


async def run_load(target: Target, mix: list[Planned], concurrency: int, args, progress: Progress) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    peaks = {"running": 0, "kv_bytes": 0, "in_flight": 0}
    stop = asyncio.Event()
    before = await _metrics(target)
    poller = asyncio.ensure_future(poll_metrics(target, peaks, stop)) if target.metrics else None
    task = progress.add_task(f"{target.name} C={concurrency}", total=len(mix))
    semaphore, in_flight = asyncio.Semaphore(concurrency), [0]
    start = time.perf_counter()

    async def bounded(http, planned):
        async with semaphore:
            if time.perf_counter() - start > args.max_seconds:
                return Outcome(planned.index, planned.kind, ok=False, detail="not started: --max-seconds")
            in_flight[0] += 1
            peaks["in_flight"] = max(peaks["in_flight"], in_flight[0])
            try:
                return await one_request(http, target, planned)
            finally:
                in_flight[0] -= 1
                progress.advance(task)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        outcomes = await asyncio.gather(*(bounded(http, planned) for planned in mix))
    wall = time.perf_counter() - start
    stop.set()
    if poller is not None:
        await poller
    progress.remove_task(task)
    after = await _settled(target)
    return summarize(target, concurrency, outcomes, wall, peaks, before, after)


async def _metrics(target: Target) -> dict[str, float]:
    if not target.metrics:
        return {}
    async with httpx.AsyncClient(timeout=10) as http:
        return parse_metrics((await http.get(f"{target.url}/metrics")).text)


async def _settled(target: Target, seconds: float = 60) -> dict:
    """The server after a run: up, and (with metrics) nothing running and no KV bytes held."""
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            try:
                up = (await http.get(f"{target.url}{target.health}")).status_code == 200
            except httpx.HTTPError:
                up = False
            values = await _metrics(target) if up else {}
            idle = not target.metrics or (
                values.get("kvsqueeze:num_requests_running") == 0
                and values.get("kvsqueeze:num_requests_waiting") == 0
                and values.get("kvsqueeze:kv_cache_bytes") == 0
            )
            if (up and idle) or time.monotonic() > end:
                return {"up": up, "no_leak": idle if target.metrics else None, "metrics": values}
            await asyncio.sleep(0.25)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(target, concurrency, outcomes, wall, peaks, before, after) -> dict:
    done = [o for o in outcomes if o.ok and o.kind == "valid"]
    tokens = sum(o.output_tokens for o in done)
    ttfts = [o.ttft for o in done if o.ttft is not None]
    gaps = [g for o in done for g in o.gaps]
    errors = [o for o in outcomes if not o.ok]
    metric = after.get("metrics", {})
    preemptions = metric.get("kvsqueeze:num_preemptions_total", 0) - before.get(
        "kvsqueeze:num_preemptions_total", 0
    )
    by_kind = {
        kind: sum(o.kind == kind for o in outcomes) for kind in ("valid", "malformed", "disconnect", "beyond")
    }
    return {
        "server": target.name,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "mix": by_kind,
        "completed": len(done),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "errors": len(errors),
        "error_examples": [asdict(o) | {"gaps": len(o.gaps)} for o in errors[:5]],
        "peak_in_flight": peaks["in_flight"],
        "peak_running": peaks["running"] if target.metrics else None,
        "peak_kv_bytes": peaks["kv_bytes"] if target.metrics else None,
        "preemptions": preemptions if target.metrics else None,
        "server_up_after": after["up"],
        "no_leak_after": after["no_leak"],
    }


# ---- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_kvsqueeze(preset: str, args, log_dir: Path) -> Target:
    """``preset``: a --kv value, with ``:batch-invariant`` appended for ``serve --batch-invariant``."""
    port = free_port()
    kv, _, mode = preset.partition(":")
    argv = [sys.executable, "-m", "kvsqueeze.cli", "serve", "--model", args.model, "--kv", kv,
            "--kv-budget", args.kv_budget, "--port", str(port), "--served-model-name", KVSQUEEZE_NAME,
            "--max-waiting", str(max(1, args.requests)), "--request-timeout", str(args.request_timeout)]  # fmt: skip
    if mode:
        argv.append("--batch-invariant")
    log = open(log_dir / f"serve-{preset.replace(':', '-')}.log", "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return Target(
        f"kvsqueeze {preset}", f"http://127.0.0.1:{port}", KVSQUEEZE_NAME, {"ignore_eos": True}, True, process
    )


def start_transformers(model_dir: str, args, log_dir: Path) -> Target:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    argv = [str(exe), "serve", model_dir, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    log = open(log_dir / "serve-transformers.log", "wb")  # noqa: SIM115
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    no_eos = {"generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})}
    return Target("transformers serve --cb", f"http://127.0.0.1:{port}", model_dir, no_eos, False, process)


def gguf_file(model: str) -> Path | None:
    """The GGUF file of ``--model`` (a named model's, found without importing its package, or a
    .gguf path), None when it has none."""
    import importlib.util

    from kvsqueeze.models import NAMED_MODELS

    named = NAMED_MODELS.get(model)
    if named is None:
        return Path(model) if model.lower().endswith(".gguf") and Path(model).is_file() else None
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / named.gguf_file
    return path if path.is_file() else None


def prepare_llama_cpp(args) -> tuple[llama_cpp_peer.Probe, Path | None]:
    """The llama.cpp peer's probe and GGUF file; ``probe.version`` is None when it is skipped."""
    if args.llama_cpp_python is None:
        return llama_cpp_peer.Probe(None, False, "no --llama-cpp-python PYTHON given"), None
    gguf = gguf_file(args.model)
    if gguf is None:
        return llama_cpp_peer.Probe(None, False, f"--model {args.model!r} has no GGUF file"), None
    return llama_cpp_peer.probe(args.llama_cpp_python, gguf, args.llama_cpp_threads, args.start_timeout), gguf


def start_llama_cpp(args, found: llama_cpp_peer.Probe, gguf: Path, context: int, log_dir: Path) -> Target:
    """llama-cpp-python's server with a q4_0 K and V cache of ``context`` tokens."""
    port, threads = free_port(), args.llama_cpp_threads
    argv = llama_cpp_peer.server_argv(
        args.llama_cpp_python, gguf, port, context, threads, found.repack, LLAMA_CPP_NAME
    )
    log_path = log_dir / "serve-llama-cpp.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    notes = {
        "llama_cpp_python": found.version,
        "weights": f"{gguf.name} ({llama_cpp_peer.WEIGHTS}; the kvsqueeze runs use its float32 dequantization)",
        "threads": threads,
        "weight_repack": found.repack,
        "weight_repack_detail": found.detail,
        "serving": llama_cpp_peer.SERVING,
        "argv": argv,
    }
    target = Target(llama_cpp_peer.LABEL, url, LLAMA_CPP_NAME, {}, False, process, health="/v1/models")

    def check() -> str | None:
        seen, problem = llama_cpp_peer.read_log(log_path.read_text(errors="replace"))
        notes.update(seen)
        target.extra = llama_cpp_peer.request_extra(seen["eog_tokens"])
        return problem

    target.check, target.notes = check, {"llama_cpp": notes}
    return target


def wait_up(target: Target, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if target.process is not None and target.process.poll() is not None:
            return False
        try:
            if httpx.get(f"{target.url}{target.health}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def warm_up(target: Target, args) -> None:
    planned = Planned(-1, "valid", "The history of the city begins", 8)
    outcome = asyncio.run(_one(target, planned, args.start_timeout))
    if not outcome.ok:
        console.print(f"[yellow]warm-up of {target.name} failed: {outcome.detail}[/yellow]")


async def _one(target: Target, planned: Planned, seconds: float) -> Outcome:
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds, connect=10)) as http:
        return await one_request(http, target, planned)


def stop_server(target: Target) -> None:
    process = target.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# ---- transformers' generate_batch ----------------------------------------------------------------


def run_generate_batch(args, mix: list[Planned], tokenizer) -> dict:
    import torch
    from transformers import GenerationConfig

    from kvsqueeze import load_model

    model, _ = load_model(args.model)
    valid = [p for p in mix if p.kind in ("valid", "disconnect")]
    inputs = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in valid]
    config = GenerationConfig(max_new_tokens=args.output_tokens, do_sample=False, eos_token_id=-1)
    with torch.inference_mode():  # warm-up, untimed, as the servers get
        model.generate_batch(
            inputs=[inputs[0][:32]],
            generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1),
        )
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model.generate_batch(inputs=inputs, generation_config=config, record_timestamps=True)
    wall = time.perf_counter() - start
    done = [o for o in outputs.values() if o.error is None]
    tokens = sum(len(o.generated_tokens) for o in done)
    ttfts = [o.timestamps[0] - o.created_time for o in done if o.timestamps]
    gaps = [b - a for o in done if o.timestamps for a, b in zip(o.timestamps, o.timestamps[1:], strict=False)]
    return {
        "server": "transformers generate_batch",
        "concurrency": len(inputs),
        "requests": len(inputs),
        "mix": {"valid": len(inputs)},
        "completed": len(done),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "errors": len(inputs) - len(done),
        "error_examples": [o.error for o in outputs.values() if o.error][:5],
        "peak_in_flight": None,
        "peak_running": None,
        "peak_kv_bytes": None,
        "preemptions": None,
        "server_up_after": None,
        "no_leak_after": None,
    }


# ---- report ---------------------------------------------------------------------------------------


def table(rows: list[dict]) -> Table:
    out = Table(title="serve load (done: valid requests completed; output tok/s; latencies in ms)")
    for column in ("server", "C", "done", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "errors",
                   "peak run", "peak KV MiB", "preempt", "up / no leak"):  # fmt: skip
        out.add_column(column, justify="left" if column == "server" else "right")

    def ms(value):
        return "-" if value is None else f"{1000 * value:,.0f}"

    for r in rows:
        kv = "-" if r["peak_kv_bytes"] is None else f"{r['peak_kv_bytes'] / 2**20:,.1f}"
        health = "-" if r["server_up_after"] is None else f"{r['server_up_after']} / {r['no_leak_after']}"
        out.add_row(
            r["server"], str(r["concurrency"]), f"{r['completed']}/{r['mix'].get('valid', 0)}", f"{r['output_tok_s']:.1f}",
            ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["itl_p50_s"]), ms(r["itl_p99_s"]), str(r["errors"]),
            "-" if r["peak_running"] is None else f"{r['peak_running']:.0f}", kv,
            "-" if r["preemptions"] is None else f"{r['preemptions']:.0f}", health,
        )  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        style = "o-" if len(mine) > 1 else "s"
        left.plot(xs, [r["output_tok_s"] for r in mine], style, label=server)
        right.plot(xs, [r["ttft_p99_s"] or float("nan") for r in mine], style, label=server)
    left.set(xlabel="concurrency (requests in flight)", ylabel="output tokens/s", title="throughput")
    right.set(
        xlabel="concurrency (requests in flight)", ylabel="TTFT p99 (s)", title="time to first token, p99"
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--kv",
        default="none,int8,k4v4,best-4bit",
        help="comma-separated presets; PRESET:batch-invariant serves it with --batch-invariant",
    )
    parser.add_argument("--kv-budget", default="256MiB")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", default="4,16", help="comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--jitter", type=float, default=0.0, help="lengths uniform in (1 +- jitter) x")
    parser.add_argument("--malformed", type=float, default=0.0, help="fraction of malformed requests")
    parser.add_argument(
        "--disconnect", type=float, default=0.0, help="fraction of clients leaving mid-stream"
    )
    parser.add_argument("--beyond-context", type=float, default=0.0, help="fraction of too-long prompts")
    parser.add_argument(
        "--peer", choices=["transformers-serve", "transformers-batch", "none"], default="transformers-serve"
    )
    parser.add_argument(
        "--llama-cpp-python",
        metavar="PYTHON",
        help="an interpreter with llama-cpp-python[server]: runs llama.cpp's server too (q4_0 K/V)",
    )
    parser.add_argument(
        "--llama-cpp-threads", type=int, default=os.cpu_count() or 1, help="default: one per core"
    )
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="per run: no request starts after")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_load.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "results" / "serve_load.png")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.kv.split(",") if p.strip()]
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    checks = {
        "--requests": args.requests >= 1,
        "--concurrency": bool(args.concurrencies) and min(args.concurrencies) >= 1,
        "--prompt-tokens": args.prompt_tokens >= 1,
        "--output-tokens": args.output_tokens >= 1,
        "--jitter": 0 <= args.jitter < 1,
        "--malformed": 0 <= args.malformed <= 1,
        "--disconnect": 0 <= args.disconnect <= 1,
        "--beyond-context": 0 <= args.beyond_context <= 1,
        "--llama-cpp-threads": args.llama_cpp_threads >= 1,
        "--kv": bool(args.presets)
        and all(p.partition(":")[2] in ("", "batch-invariant") for p in args.presets),
    }
    for flag, ok in checks.items():
        if not ok:
            parser.error(f"{flag}: {getattr(args, flag[2:].replace('-', '_'), None)!r} is out of range")
    if args.malformed + args.disconnect + args.beyond_context > 1:
        parser.error("--malformed + --disconnect + --beyond-context: more than 1")
    return args


def main() -> None:
    args = parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from kvsqueeze.eval.report import git_revision, save_results
    from kvsqueeze.eval.text import load_text
    from kvsqueeze.integrations.context import context_limit
    from kvsqueeze.models import resolve_model

    model_dir = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    context = context_limit(config.get_text_config(decoder=True)).tokens or 8192
    ids = tokenizer(load_text(args.text_file, "--text-file"), add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    mix = make_mix(args, tokenizer, ids, context)
    log_dir = args.out.parent / "serve_load_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    starters = [(preset, lambda p=preset: start_kvsqueeze(p, args, log_dir)) for preset in args.presets]
    if args.peer == "transformers-serve":
        starters.append(("transformers", lambda: start_transformers(model_dir, args, log_dir)))
    found, gguf = prepare_llama_cpp(args)
    servers: dict[str, dict] = {}  # name -> notes and why it was skipped (None: it ran)
    if found.version is None:
        console.print(f"[yellow]llama.cpp peer skipped: {found.detail}[/yellow]")
        servers[llama_cpp_peer.LABEL] = {"skipped": found.detail}
    else:
        kv = f"{llama_cpp_peer.KV_TYPE} K / {llama_cpp_peer.KV_TYPE} V (llama.cpp)"
        starters.append((kv, lambda: start_llama_cpp(args, found, gguf, context, log_dir)))
    with Progress(console=console, transient=True) as progress:
        for name, start in starters:
            target = start()
            try:
                console.print(f"starting {target.name} ...")
                problem = None if wait_up(target, args.start_timeout) else "did not come up"
                if problem is None and target.check is not None:
                    problem = target.check()
                servers[target.name] = target.notes | {"skipped": problem}
                if problem is not None:
                    console.print(f"[red]{target.name} skipped: {problem}; see {log_dir}[/red]")
                    continue
                warm_up(target, args)
                for concurrency in args.concurrencies:
                    row = asyncio.run(run_load(target, mix, concurrency, args, progress))
                    rows.append(row | {"kv": name} | target.notes)
                    console.print(
                        f"{target.name} C={concurrency}: {row['output_tok_s']:.1f} tok/s, {row['errors']} errors"
                    )
            finally:
                stop_server(target)
    if args.peer == "transformers-batch":
        console.print("transformers generate_batch ...")
        rows.append(run_generate_batch(args, mix, tokenizer) | {"kv": "exact (transformers)"})
    out_console.print(table(rows))
    results = {"runs": rows, "servers": servers, "git": git_revision(ROOT)}
    run_config = vars(args) | {"text_file": str(args.text_file), "out": str(args.out), "plot": str(args.plot)}
    save_results(args.out, run_config, results)
    plot(rows, args.plot)
    best = {
        r["server"]: round(max(x["output_tok_s"] for x in rows if x["server"] == r["server"]), 2)
        for r in rows
    }
    print(
        json.dumps(
            {"output_tok_s_best": best, "errors": sum(r["errors"] for r in rows), "saved": str(args.out)}
        )
    )


if __name__ == "__main__":
    main()
