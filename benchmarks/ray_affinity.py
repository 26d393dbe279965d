"""Prefix-affinity routing across engine replicas on Ray Serve (issue 17), on loopback.

    python benchmarks/ray_affinity.py [--model smollm2-135m] [--kv k4v4] [--system-tokens 1500]
        [--prompts 4] [--turns 32] [--user-tokens 24] [--output-tokens 8] [--concurrency 4]
        [--runs prefix,random,single] [--affinity-blocks 4] [--max-imbalance 4] [--text-file PATH]

Workload: ``--prompts`` distinct system prompts of ``--system-tokens`` tokens (WikiText-2 raw test at
distinct offsets) x ``--turns`` user turns each (``--user-tokens`` tokens, distinct), sent as chat
requests (system + user message) interleaved over the prompts (turn 1 of every prompt, then turn 2,
...), ``--concurrency`` in flight, each asking for ``--output-tokens`` tokens with the end of
sequence ignored. Runs, each on fresh replicas (empty prefix caches) of one local Ray cluster of 2
CPUs:

- ``prefix``: 2 replicas (1 CPU and 1 torch thread each), prefix-affinity routing
- ``random``: 2 replicas, random routing (the baseline, measured the same way)
- ``single``: 1 replica with 2 CPUs and 2 torch threads (throughput of 2 replicas vs 1)

Hit rate = prompt tokens found in a replica's prefix cache / prompt tokens, summed over the
requests; per request both come from the engine's own counters (`LLMEngine._admit`: the tokens its
`match_prefix` found, reported as ``usage.prompt_tokens_details.cached_tokens``). The ceiling is
what a perfect router reaches on this workload: every request but the first of each system prompt
finds the system prompt's full blocks. Throughput = requests and generated tokens per second of
wall time. Every request times out after ``--request-timeout`` s, a run stops starting requests
after ``--max-seconds``. Prints a table, saves JSON (config, environment, runs) and ends with one
JSON line. Numbers from a shared machine are preliminary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RUNS = {  # name: (replicas, CPUs each, routing)
    "prefix": (2, 1.0, "prefix"),
    "random": (2, 1.0, "random"),
    "single": (1, 2.0, "prefix"),
}


def make_workload(args, tokenizer) -> list[dict]:
    """The chat requests, interleaved over the system prompts; each knows its system prompt's index."""
    from kvsqueeze.eval.text import load_text

    ids = tokenizer(load_text(args.text_file, "--text-file"), add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    rng = random.Random(0)
    span = args.system_tokens + args.turns * args.user_tokens
    starts = rng.sample(range(0, len(ids) - span, span), args.prompts)  # disjoint slices of the text
    systems, users = [], []
    for start in starts:
        systems.append(tokenizer.decode(ids[start : start + args.system_tokens]))
        base = start + args.system_tokens
        users.append([tokenizer.decode(ids[base + t * args.user_tokens : base + (t + 1) * args.user_tokens])
                      for t in range(args.turns)])  # fmt: skip
    return [
        {"system": p, "body": {
            "model": args.model, "max_tokens": args.output_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": systems[p]}, {"role": "user", "content": users[p][t]}],
        }}
        for t in range(args.turns)
        for p in range(args.prompts)
    ]  # fmt: skip


async def run_load(url: str, workload: list[dict], args) -> dict:
    """Send the workload with ``--concurrency`` in flight; per request its outcome and usage."""
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.max_seconds
    rows: list[dict] = []

    async def one(http: httpx.AsyncClient, item: dict) -> None:
        async with sem:
            if time.monotonic() > deadline:
                rows.append({"system": item["system"], "outcome": "not started (--max-seconds)"})
                return
            started = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=item["body"])
                usage = r.json().get("usage") if r.status_code == 200 else None
                outcome = "ok" if usage else f"status {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                usage, outcome, r = None, f"{type(err).__name__}", None
            rows.append({
                "system": item["system"], "outcome": outcome, "seconds": time.monotonic() - started,
                "replica": r.headers.get("x-kvsqueeze-replica") if r is not None else None,
                "prompt_tokens": usage["prompt_tokens"] if usage else 0,
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"] if usage else 0,
                "completion_tokens": usage["completion_tokens"] if usage else 0,
            })  # fmt: skip

    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        started = time.monotonic()
        await asyncio.gather(*(one(http, item) for item in workload))
        wall = time.monotonic() - started
    return {"wall_s": wall, "requests": rows}


def summarize(name: str, load: dict, ceiling: float) -> dict:
    ok = [r for r in load["requests"] if r["outcome"] == "ok"]
    prompt = sum(r["prompt_tokens"] for r in ok)
    per_system = collections.defaultdict(collections.Counter)
    for r in ok:
        per_system[r["system"]][r["replica"]] += 1
    return {
        "run": name,
        "replicas": RUNS[name][0],
        "routing": RUNS[name][2],
        "requests_ok": len(ok),
        "errors": len(load["requests"]) - len(ok),
        "hit_rate": sum(r["cached_tokens"] for r in ok) / prompt if prompt else 0.0,
        "hit_rate_ceiling": ceiling,
        "prompt_tokens": prompt,
        "wall_s": load["wall_s"],
        "requests_per_s": len(ok) / load["wall_s"],
        "output_tok_s": sum(r["completion_tokens"] for r in ok) / load["wall_s"],
        "replicas_per_system_prompt": [len(per_system[p]) for p in sorted(per_system)],
        "requests_per_replica": dict(collections.Counter(r["replica"] for r in ok)),
        "errors_seen": sorted({r["outcome"] for r in load["requests"] if r["outcome"] != "ok"})[:5],
    }


def ceiling_of(workload: list[dict], tokenizer, args, sink_tokens: int, block_size: int) -> float:
    """The hit rate if every request but the first of its system prompt found the system prompt's full
    blocks (and the sinks): ``sinks + block_size * floor((shared tokens - sinks) / block_size)``."""
    from kvsqueeze.serve.app import chat_prompt_ids
    from kvsqueeze.serve.protocol import ChatCompletionRequest, parse_request

    seen, found, total = set(), 0, 0
    first_ids: dict[int, list[int]] = {}
    for item in workload:
        request = parse_request(json.dumps(item["body"]).encode(), ChatCompletionRequest)
        ids = chat_prompt_ids(tokenizer, request)
        total += len(ids)
        p = item["system"]
        if p not in seen:
            seen.add(p)
            first_ids[p] = ids
            continue
        shared = next(
            (i for i, (a, b) in enumerate(zip(ids, first_ids[p], strict=False)) if a != b), len(ids)
        )
        shared = min(shared, len(ids) - 1)  # at least one token is computed
        found += sink_tokens + block_size * max(0, (shared - sink_tokens) // block_size)
    return found / total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def table(rows: list[dict]) -> Table:
    t = Table(title="prefix affinity on Ray Serve (preliminary: shared machine)")
    for col in ("run", "replicas", "routing", "ok/err", "hit rate", "ceiling", "req/s", "out tok/s",
                "replicas per system prompt"):  # fmt: skip
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["run"], str(r["replicas"]), r["routing"], f"{r['requests_ok']}/{r['errors']}",
            f"{100 * r['hit_rate']:.1f} %", f"{100 * r['hit_rate_ceiling']:.1f} %", f"{r['requests_per_s']:.2f}",
            f"{r['output_tok_s']:.1f}", str(r["replicas_per_system_prompt"]),
        )  # fmt: skip
    return t


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv", default="k4v4")
    ap.add_argument("--kv-budget", default="256MiB", help="per replica")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--turns", type=int, default=32)
    ap.add_argument("--user-tokens", type=int, default=24)
    ap.add_argument("--output-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--affinity-blocks", type=int, default=4)
    ap.add_argument("--max-imbalance", type=int, default=4, help="prefix routing: see ReplicaConfig")
    ap.add_argument("--runs", default="prefix,random,single", help=f"comma-separated, of {list(RUNS)}")
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="per run: no request starts after this")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "ray_affinity.json")
    args = ap.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"--runs: {unknown} unknown; allowed: {list(RUNS)}")
    for flag in ("system_tokens", "prompts", "turns", "user_tokens", "output_tokens", "concurrency"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}: {getattr(args, flag)}; allowed: an integer >= 1")
    return args


def main() -> None:
    args = parse_args()
    from ray import serve
    from transformers import AutoTokenizer

    from kvsqueeze.config import resolve_config
    from kvsqueeze.eval.report import git_revision, save_results
    from kvsqueeze.models import resolve_model
    from kvsqueeze.serve.replicas import EngineSpec, ReplicaConfig
    from kvsqueeze.serve.replicas.app import APP_NAME, build_app, start, stop, wait_running

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    workload = make_workload(args, tokenizer)
    layout = resolve_config(args.kv)  # sinks and block size of the prefix cache
    ceiling = ceiling_of(workload, tokenizer, args, layout.sink_tokens, layout.block_size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows, loads = [], {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        for i, name in enumerate(args.runs):
            replicas, cpus, routing = RUNS[name]
            config = ReplicaConfig(
                engine=EngineSpec(kwargs={"model": args.model, "kv": args.kv, "kv_budget": args.kv_budget,
                                          "model_name": args.model}),  # fmt: skip
                num_replicas=replicas, num_cpus=cpus, routing=routing, affinity_blocks=args.affinity_blocks,
                max_imbalance=args.max_imbalance, timeout_s=args.request_timeout,
            )  # fmt: skip
            console.print(f"[dim]{name}: starting {replicas} replica(s), routing {routing} ...[/dim]")
            if i == 0:
                start(config, port=port, num_cpus=2, wait_s=args.start_timeout)
            else:
                serve.delete(APP_NAME)  # fresh replicas: empty prefix caches
                serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
                wait_running(replicas, args.start_timeout)
            load = asyncio.run(run_load(url, workload, args))
            loads[name] = load
            rows.append(summarize(name, load, ceiling))
            console.print(
                f"{name}: hit rate {100 * rows[-1]['hit_rate']:.1f} %, {rows[-1]['requests_per_s']:.2f} req/s"
            )
    finally:
        stop()
    Console(width=None if sys.stdout.isatty() else 170).print(table(rows))
    save_results(args.out, vars(args) | {"text_file": str(args.text_file), "out": str(args.out)},
                 {"runs": rows, "requests": loads, "git": git_revision(ROOT)})  # fmt: skip
    by = {r["run"]: r for r in rows}
    summary = {"hit_rate": {r["run"]: round(r["hit_rate"], 4) for r in rows}, "ceiling": round(ceiling, 4),
               "requests_per_s": {r["run"]: round(r["requests_per_s"], 3) for r in rows},
               "errors": sum(r["errors"] for r in rows), "saved": str(args.out)}  # fmt: skip
    if "prefix" in by and "single" in by:
        summary["speedup_2_vs_1"] = round(by["prefix"]["requests_per_s"] / by["single"]["requests_per_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
