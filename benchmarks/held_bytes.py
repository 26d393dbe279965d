"""Held bytes (issue 13): everything a cache object holds, over an fp16 cache of the same tokens.

    python benchmarks/held_bytes.py [--methods k4v4,int8,k2v2,quanto-int4] [--contexts 16,70,2048,4096]
        [--chunk 512] [--text-file PATH]

The embedded SmolLM2-135M (float32 weights; an fp16 cache is 23,040 B/token) reads the first
``context`` tokens of WikiText-2 raw test, prefilled in chunks of ``--chunk`` tokens (one forward
when shorter), and the cache's bytes are measured: a `SqueezedCache` by its own ``nbytes()``,
checked against a walk of the tensors its stores hold (scratch included: the reference path keeps
nothing between forwards), transformers' caches (quanto int4: group 64, residual 128) by a walk of
their tensors (`eval.memory.cache_nbytes`). Deterministic: one run, no timing. Prints a table and
ends with one JSON line (also saved under results/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import load_model
from kvsqueeze.eval.memory import cache_nbytes, store_tensor_bytes
from kvsqueeze.eval.methods import method_available, resolve_methods
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.eval.text import load_text, tokenize_text

console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in logs
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
FP16_BYTES_PER_TOKEN = 2 * 2 * 30 * 3 * 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="k4v4,int8,k2v2,quanto-int4", help="(default: %(default)s)")
    parser.add_argument("--contexts", default="16,70,300,2048,4096", help="(default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (default: %(default)s)")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=Path("results/held_bytes.json"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    methods = [m for m in resolve_methods(args.methods) if method_available(m)[0]]
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_text(tokenizer, load_text(args.text_file))[: max(contexts)][None]
    rows = []
    for method in methods:
        for context in contexts:
            cache = method.make_cache(model)
            with torch.no_grad():
                for start in range(0, context, args.chunk):
                    model(
                        ids[:, start : min(context, start + args.chunk)],
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
            held, how = cache_nbytes(cache)
            stores = [layer.store for layer in getattr(cache, "layers", []) if hasattr(layer, "store")]
            if stores:
                assert held == store_tensor_bytes(stores), "reported bytes differ from the tensors held"
            report = cache.memory_report().describe() if hasattr(cache, "memory_report") else ""
            rows.append(
                {
                    "method": method.name,
                    "context": context,
                    "held_bytes": held,
                    "measured_by": how,
                    "bytes_per_token": held / context,
                    "fraction_of_fp16": held / (context * FP16_BYTES_PER_TOKEN),
                    "exact_tokens": report,
                }
            )
            console.print(
                f"{method.name} @ {context}: {held / (context * FP16_BYTES_PER_TOKEN):.3f} of fp16 {report}"
            )
    table = Table(title=f"Held bytes / fp16 cache of the same tokens (prefill in chunks of {args.chunk})")
    table.add_column("method", no_wrap=True)
    for c in contexts:
        table.add_column(str(c), justify="right")
    for method in methods:
        cells = [f"{r['fraction_of_fp16']:.3f}" for r in rows if r["method"] == method.name]
        table.add_row(method.name, *cells)
    console.print(table)
    save_results(args.out, vars(args) | {"text_file": str(args.text_file), "out": str(args.out)}, rows)
    print(json.dumps({"benchmark": "held_bytes", "environment": environment(), "rows": rows}))


if __name__ == "__main__":
    main()
