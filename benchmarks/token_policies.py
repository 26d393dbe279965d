"""Issue-6 figures: token-role and importance mixed precision, eviction with and without quantization.

    OMP_NUM_THREADS=1 python benchmarks/token_policies.py [--parts passkey,ppl] [--seeds 10]

Embedded SmolLM2-135M, every cache read by the fused path (``attn_implementation="kvsqueeze"``;
the exact DynamicCache runs SDPA under it). Bytes are everything the cache holds (`nbytes`) at
the end of a run, over an fp16 cache of the tokens seen (23,040 B/token).

* passkey: 2048-token prompts, key depths 0.5 and 0.9, ``--seeds`` keys each, prompt prefilled in
  one forward. ``k2v2-instruct`` gets the prompt's chat template, intro and question marked as
  instructions (exact) and its haystack at 2 bits; ``k2v2-instruct-snap3`` also keeps exact the 3 %
  of tokens the prompt's last 32 queries attend to most (SnapKV); plain ``k2v2`` for comparison.
* ppl: streamed perplexity, the reference protocol (2 x 2048 tokens from the start of WikiText-2
  test, prefill 256, chunks of 64), with KLD and top-1 agreement against the exact cache.
  ``k2v2-keep10`` (by name: the bundled per-layer budgets of the embedded model, fitted on the last
  tokens of the file) against ``k2v2-keep10-uniform`` (10 % in every layer).
* eviction at 25 % of fp16 bytes: H2O-style eviction alone (kept tokens exact in fp16) against
  eviction + quantization (kept tokens k4v2), fractions chosen to land at the same bytes.

Prints a table per part, the figures met or not, and one JSON line (also saved under results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.config import CacheConfig, TokenPolicy, preset
from kvsqueeze.eval.perplexity import StreamSpec, streamed_perplexity
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.eval.retrieval import (
    RetrievalSpec,
    answer_ids,
    instruction_spans,
    is_correct,
    make_passkey_prompt,
)
from kvsqueeze.eval.text import default_text_file, load_text, tokenize_text
from kvsqueeze.policies import mark_spans

FP16_BYTES_PER_TOKEN = 23_040
console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in logs


def methods(evict_only: float, evict_quant: float) -> dict[str, CacheConfig | str | None]:
    """Name -> cache config or preset name (names get the bundled calibration; None: DynamicCache)."""
    fp16_exact = dict(scorer="attention", exact_dtype="float16")
    return {
        "exact": None,
        "k2v2": preset("k2v2"),
        "k2v2-instruct": "k2v2-instruct",
        "k2v2-instruct-snap3": "k2v2-instruct-snap3",
        "k2v2-keep10": "k2v2-keep10",  # the embedded model: per-layer budgets from the bundled calibration
        "k2v2-keep10-uniform": preset("k2v2-keep10"),  # the same 10 % in every layer
        "k2v2-keep10-knorm": "k2v2-keep10-knorm",
        "k2v2-keep10-krange": "k2v2-keep10-krange",
        f"h2o-evict{round(100 * evict_only)}": CacheConfig(
            key=None,
            value=None,
            block_size=32,
            page_tokens=32,
            tokens=TokenPolicy(default="exact", evict=evict_only, **fp16_exact),
        ),  # fmt: skip
        f"h2o-evict{round(100 * evict_quant)}-k4v2": preset("k4v2").replace(
            page_tokens=64, tokens=TokenPolicy(default="low", evict=evict_quant, **fp16_exact)
        ),
    }


def make_cache(model, config: CacheConfig | str | None):
    if config is None:
        return DynamicCache(config=model.config)
    return SqueezedCache.from_model(model, config, fused=True)


def fraction_of_fp16(cache) -> float:
    return cache.nbytes() / (FP16_BYTES_PER_TOKEN * cache.get_seq_length())


def run_passkey(model, tokenizer, configs: dict, seeds: int, chunk: int) -> list[dict]:
    spec = RetrievalSpec(
        task="passkey", lengths=(2048,), depths=(0.5, 0.9), num_seeds=seeds, chunk_tokens=chunk
    )
    eos_ids = {tokenizer.eos_token_id}
    spans = instruction_spans(tokenizer, "passkey", 2048)
    roles = mark_spans(torch.zeros(1, 2048, dtype=torch.int8), spans)
    rows = {
        name: {"method": name, "correct": 0, "trials": 0, "fractions": [], "seconds": 0.0} for name in configs
    }
    for depth in spec.depths:
        for seed in range(seeds):
            input_ids, key, _ = make_passkey_prompt(tokenizer, 2048, depth, seed)
            for name, config in configs.items():
                start = time.perf_counter()
                cache = make_cache(model, config)
                if config is not None and cache.cache_config.tokens is not None:
                    cache.set_roles(roles)
                ids = answer_ids(model, input_ids, cache, spec, eos_ids)
                ok = is_correct(tokenizer.decode(ids, skip_special_tokens=True), key)
                row = rows[name]
                row["correct"] += ok
                row["trials"] += 1
                row[f"correct@{depth}"] = row.get(f"correct@{depth}", 0) + ok
                row["seconds"] += time.perf_counter() - start
                if config is not None:
                    row["fractions"].append(fraction_of_fp16(cache))
            console.print(
                f"passkey depth {depth} seed {seed}: "
                + ", ".join(f"{n} {r['correct']}/{r['trials']}" for n, r in rows.items())
            )
    out = []
    for row in rows.values():
        f = row.pop("fractions")
        out.append(
            {
                **row,
                "accuracy": row["correct"] / row["trials"],
                "fraction_of_fp16": sum(f) / len(f) if f else 2.0,
            }
        )
    return out


def run_ppl(model, ids: torch.Tensor, configs: dict) -> list[dict]:
    spec = StreamSpec(window_tokens=2048, num_windows=2, prefill_tokens=256, chunk_tokens=64)
    exact = streamed_perplexity(model, ids, lambda m: make_cache(m, None), spec, progress=False)
    rows = [{"method": "exact", **exact.to_dict(), "delta_pct": 0.0, "fraction_of_fp16": 2.0}]
    for name, config in configs.items():
        if config is None:
            continue
        caches: list = []

        def factory(m, config=config, caches=caches):
            caches.append(make_cache(m, config))
            return caches[-1]

        res = streamed_perplexity(
            model, ids, factory, spec, reference=lambda m: make_cache(m, None), progress=False
        )
        fraction = sum(fraction_of_fp16(c) for c in caches) / len(caches)
        delta = 100 * (res.ppl / exact.ppl - 1)
        rows.append({"method": name, **res.to_dict(), "delta_pct": delta, "fraction_of_fp16": fraction})
        console.print(
            f"ppl {name}: {res.ppl:.4f} ({delta:+.3f} %), KLD {res.kld_mean:.5f}, {fraction:.4f} of fp16"
        )
    return rows


def figures(results: dict, evict_names: tuple[str, str]) -> list[dict]:
    """The issue's three figures: measured values and whether each is met."""
    out = []
    pk = {r["method"]: r for r in results.get("passkey", [])}
    pp = {r["method"]: r for r in results.get("ppl", [])}
    for role in ("k2v2-instruct", "k2v2-instruct-snap3"):
        if {"exact", role} <= pk.keys():
            e, r = pk["exact"], pk[role]
            met = r["accuracy"] >= e["accuracy"] and r["fraction_of_fp16"] <= 0.25
            out.append({"figure": f"role: passkey({role}) == passkey(exact) at <= 0.25 fp16", "met": met,
                        "exact": e["accuracy"], role: r["accuracy"], "fraction": r["fraction_of_fp16"],
                        "k2v2": pk.get("k2v2", {}).get("accuracy")})  # fmt: skip
    for keep in ("k2v2-keep10", "k2v2-keep10-uniform", "k2v2-keep10-knorm", "k2v2-keep10-krange"):
        if {"exact", "k2v2", keep} <= pp.keys():
            e, b, k = pp["exact"]["ppl"], pp["k2v2"], pp[keep]
            recovered = (b["ppl"] - k["ppl"]) / (b["ppl"] - e)
            ratio = k["fraction_of_fp16"] / b["fraction_of_fp16"]
            out.append({"figure": f"importance: {keep} recovers >= 50 % of k2v2's PPL loss at <= 1.35x bytes",
                        "met": recovered >= 0.5 and ratio <= 1.35, "recovered": recovered, "bytes_ratio": ratio})  # fmt: skip
    alone, quant = evict_names
    if {alone, quant} <= pk.keys() and {alone, quant} <= pp.keys():
        met = (pk[quant]["accuracy"] > pk[alone]["accuracy"] and pp[quant]["ppl"] < pp[alone]["ppl"]
               and max(pk[quant]["fraction_of_fp16"], pp[quant]["fraction_of_fp16"]) <= 0.25 + 0.005)  # fmt: skip
        out.append({"figure": "eviction+quant beats eviction alone at 25 % fp16 (passkey and PPL)", "met": met,
                    "passkey": [pk[alone]["accuracy"], pk[quant]["accuracy"]], "ppl": [pp[alone]["ppl"], pp[quant]["ppl"]],
                    "fractions_passkey": [pk[alone]["fraction_of_fp16"], pk[quant]["fraction_of_fp16"]],
                    "fractions_ppl": [pp[alone]["fraction_of_fp16"], pp[quant]["fraction_of_fp16"]]})  # fmt: skip
    return out


def print_tables(results: dict) -> None:
    if "passkey" in results:
        t = Table(title="Passkey, 2048 tokens, depths 0.5 / 0.9")
        for c in ("method", "accuracy", "@0.5", "@0.9", "bytes / fp16", "seconds"):
            t.add_column(c, justify="right")
        for r in results["passkey"]:
            t.add_row(r["method"], f"{r['accuracy']:.2f}", str(r.get("correct@0.5")), str(r.get("correct@0.9")),
                      f"{r['fraction_of_fp16']:.4f}", f"{r['seconds']:.0f}")  # fmt: skip
        console.print(t)
    if "ppl" in results:
        t = Table(title="Streamed perplexity, WikiText-2 (2 x 2048, prefill 256, chunks 64)")
        for c in ("method", "ppl", "Δ %", "KLD", "top-1", "bytes / fp16"):
            t.add_column(c, justify="right")
        for r in results["ppl"]:
            kld = "-" if r.get("kld_mean") is None else f"{r['kld_mean']:.5f}"
            top1 = "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.4f}"
            t.add_row(
                r["method"],
                f"{r['ppl']:.4f}",
                f"{r['delta_pct']:+.3f}",
                kld,
                top1,
                f"{r['fraction_of_fp16']:.4f}",
            )
        console.print(t)
    for f in results.get("figures", []):
        console.print(("MET     " if f["met"] else "NOT MET ") + json.dumps(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="passkey,ppl")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the method names (with --combine: rows kept)",
    )
    parser.add_argument("--chunk", type=int, default=2048, help="passkey prefill chunk (2048: one forward)")
    parser.add_argument("--evict-only", type=float, default=0.80, help="evicted fraction, eviction alone")
    parser.add_argument("--evict-quant", type=float, default=0.20, help="evicted fraction, eviction + k4v2")
    parser.add_argument("--out", default="results/token_policies.json")
    parser.add_argument(
        "--combine", default=None, help="JSON results of earlier runs (comma-separated): merge, report"
    )
    args = parser.parse_args(argv)
    if args.combine:  # parts run as separate processes: one table and one figure list
        results = {}
        keep = set(args.methods.split(",")) | {"exact"} if args.methods else None
        for path in args.combine.split(","):
            for part, rows in json.loads(Path(path).read_text())["results"].items():
                if part != "figures":  # rows of the same part from several runs: first run wins
                    known = {r["method"] for r in results.setdefault(part, [])}
                    results[part] += [
                        r for r in rows if r["method"] not in known and (keep is None or r["method"] in keep)
                    ]
        names = {r["method"] for part in results.values() for r in part}
        evict = sorted((n for n in names if n.startswith("h2o-")), key=lambda n: "-k" in n)  # alone first
        results["figures"] = figures(results, tuple(evict))
        print_tables(results)
        print(json.dumps({"benchmark": "token_policies", "combined": args.combine, **results}, default=str))
        return 0
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", attn_implementation="kvsqueeze")
    configs = methods(args.evict_only, args.evict_quant)
    evict_names = tuple(n for n in configs if n.startswith("h2o-"))
    if args.methods:
        wanted = args.methods.split(",")
        configs = {n: c for n, c in configs.items() if n in wanted or n == "exact"}
    parts = args.parts.split(",")
    results: dict = {}
    if "passkey" in parts:
        passkey_configs = {n: c for n, c in configs.items() if "keep10" not in n}
        results["passkey"] = run_passkey(model, tokenizer, passkey_configs, args.seeds, args.chunk)
    if "ppl" in parts:
        ppl_configs = {n: c for n, c in configs.items() if "instruct" not in n}
        ids = tokenize_text(tokenizer, load_text(default_text_file()))
        results["ppl"] = run_ppl(model, ids, ppl_configs)
    results["figures"] = figures(results, evict_names)
    print_tables(results)
    config = {
        "model": "smollm2-135m",
        "parts": parts,
        "seeds": args.seeds,
        "passkey_chunk": args.chunk,
        "methods": {n: c if c is None or isinstance(c, str) else c.to_dict() for n, c in configs.items()},
    }
    save_results(args.out, config, results)
    print(
        json.dumps(
            {"benchmark": "token_policies", "config": config, "environment": environment(), **results},
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
