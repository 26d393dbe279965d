"""Greedy outputs under concurrency vs the same requests one at a time (issue 14's equality figure).

    python benchmarks/serve_equality.py [--kv none,k4v4] [--modes default,invariant] [--requests 48]
        [--output-tokens 32] [--min-prompt 64] [--max-prompt 600] [--text-file PATH]

For each format, one `LLMEngine` over the embedded model answers ``--requests`` WikiText-2 prompts
(random lengths in [min, max], seeded) greedily, first one request at a time ("solo": the engine
holds only that request), then all at once (one ragged batch: prefill chunks mixed with decodes,
then up to ``--requests`` sequences decoding together). Reported: the share of requests whose
tokens are identical, and for the others the first differing position, and the wall time of both
passes. Each format runs in each of ``--modes``: ``default`` (the GEMM picks its blocking per batch
size) and ``invariant`` (``LLMEngine(batch_invariant=True)``: GEMMs of one shape). The engine is the server's
(`kvsqueeze serve` only adds HTTP around it). Prints a table, saves JSON, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from kvsqueeze import load_model
from kvsqueeze.engine import LLMEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    """Run ``engine`` until it is idle; the tokens of each request. Raises RuntimeError when a
    request ends with an error (an empty answer must not count as equal)."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason == "error":
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv", default="none,k4v4")
    parser.add_argument("--modes", default="default,invariant")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_equality.json")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or any(m not in ("default", "invariant") for m in modes):
        parser.error(f"--modes: {args.modes!r}; allowed: default, invariant or both, comma-separated")
    if not args.text_file.is_file():
        parser.error(f"--text-file: {args.text_file} does not exist; give the WikiText-2 raw test file")
    model, tokenizer = load_model(args.model)
    ids = tokenizer(args.text_file.read_text(encoding="utf-8")[:2_000_000])["input_ids"]
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.requests):
        n = rng.randint(args.min_prompt, args.max_prompt)
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start : start + n])
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    rows = []
    for kv, mode in [(kv, mode) for kv in args.kv.split(",") for mode in modes]:
        invariant = mode == "invariant"
        engine = LLMEngine(model, tokenizer, kv=kv, batch_invariant=invariant)
        t0 = time.perf_counter()
        solo = {}
        for i, p in enumerate(track(prompts, description=f"{kv} {mode} solo")):
            engine.add_request(f"s{i}", p, params)
            solo[i] = drain(engine)[f"s{i}"]
        solo_s = time.perf_counter() - t0
        leaked = engine.pool.num_used
        engine = LLMEngine(
            model, tokenizer, kv=kv, batch_invariant=invariant
        )  # a fresh pool: no prefix hit from the solo runs
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"c{i}", p, params)
        together = drain(engine)
        batch_s = time.perf_counter() - t0
        diffs = []
        for i in range(len(prompts)):
            a, b = solo[i], together[f"c{i}"]
            if len(a) != args.output_tokens or len(b) != args.output_tokens:
                raise RuntimeError(
                    f"request {i}: {len(a)} tokens alone, {len(b)} together; asked {args.output_tokens}"
                )
            if a != b:
                diffs.append(next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
        same = len(prompts) - len(diffs)
        rows.append(
            {
                "kv": kv, "mode": mode, "requests": len(prompts), "identical": same, "share": round(same / len(prompts), 4),
                "first_difference_at": diffs, "solo_seconds": round(solo_s, 1),
                "concurrent_seconds": round(batch_s, 1), "leaked_blocks": leaked + engine.pool.num_used,
            }
        )  # fmt: skip
    table = Table(title=f"Greedy tokens, concurrent vs solo ({args.output_tokens} tokens per request)")
    columns = ("kv", "mode", "identical", "share", "first differing token of the others", "solo s",
               "concurrent s", "leaked blocks")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["kv"], r["mode"], f"{r['identical']}/{r['requests']}", f"{r['share']:.1%}",
            ", ".join(map(str, r["first_difference_at"])) or "-", str(r["solo_seconds"]),
            str(r["concurrent_seconds"]), str(r["leaked_blocks"]),
        )  # fmt: skip
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2)
    )
    print(json.dumps({"serve_equality": {f"{r['kv']}/{r['mode']}": r["share"] for r in rows}}))


if __name__ == "__main__":
    main()
