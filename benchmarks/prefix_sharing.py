"""Prefix sharing over one block pool (issue 13): N sequences with a common prefix, one `KVPool`.

    python benchmarks/prefix_sharing.py [--preset k4v4] [--prefix 3000] [--private 100] [--sequences 8]
        [--chunk 512] [--repeats 3] [--text-file PATH]

The embedded SmolLM2-135M (float32, attention "kvsqueeze": the fused path) reads WikiText-2 raw
test: the prefix is its first ``--prefix`` tokens, sequence i adds the ``--private`` tokens that
follow at offset ``prefix + i * private`` (distinct text). Sequence 1 prefills everything; each
later one first takes the cached blocks of the prefix (`SqueezedCache.match_prefix`) and runs
the model only on what is left (the tokens after the last whole cached block: the residual window
of the prefix and its private tokens). Prefills run in chunks of ``--chunk`` tokens.

Figures, measured side by side in one run:

* held bytes of the pool plus every cache's own exact parts (sinks, windows, tables) over those of
  one prefix plus N private parts: ``bytes(seq 1) + (N - 1) * (bytes(seq 1) - shared)``, where
  ``bytes(seq 1)`` is a cache of its own holding prefix + private tokens and ``shared`` the bytes of
  the blocks a later sequence takes by reference (what perfect sharing would hold: every sequence
  keeps its own sinks, exact window and blocks past the shared ones). Also printed: the ratio to
  ``bytes(seq 1) + (N - 1) * (bytes(seq 1) - bytes(prefix alone))``, which counts a private part
  as 100 mostly quantized tokens and so leaves out that each sequence needs its own exact window;
* prefill seconds of sequence 1 over the median of sequences 2..N (median of ``--repeats`` runs,
  each on a fresh pool), and the tokens the model ran on.

Prints a table and ends with one JSON line (also saved under results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import KVPool, SqueezedCache, load_model
from kvsqueeze.eval.report import save_results
from kvsqueeze.eval.text import load_text, tokenize_text
from kvsqueeze.storage.layer import LayerStore

console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"


def prefill(model, cache: SqueezedCache, ids: torch.Tensor, chunk: int) -> int:
    """Run the model on the tokens of ``ids`` (1, n) the cache does not hold; returns how many."""
    start = cache.get_seq_length()
    with torch.no_grad():
        for s in range(start, ids.shape[1], chunk):
            model(ids[:, s : s + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return ids.shape[1] - start


def own_bytes(cache: SqueezedCache) -> int:
    """Bytes a cache on a shared pool holds itself: everything but the pool's blocks."""
    total = 0
    for layer in cache.layers:
        store = getattr(layer, "store", None)
        if isinstance(store, LayerStore):
            total += store.nbytes - store.packed_k.nbytes - store.packed_v.nbytes
            total += store.packed_k.tables.nbytes + store.packed_v.tables.nbytes
    return total


def one_run(model, preset: str, prefix: torch.Tensor, privates: list[torch.Tensor], chunk: int) -> dict:
    pool = KVPool()
    caches, seconds, computed, hits = [], [], [], []
    for private in privates:
        ids = torch.cat([prefix, private], dim=1)
        cache = SqueezedCache.from_model(model, preset, pool=pool)
        t0 = time.perf_counter()
        held = cache.match_prefix(ids)
        computed.append(prefill(model, cache, ids, chunk))
        seconds.append(time.perf_counter() - t0)
        hits.append(held)
        caches.append(cache)
    held_total = pool.nbytes + sum(own_bytes(c) for c in caches)
    sinks = caches[0].cache_config.sink_tokens
    per_block = sum(p.block_nbytes for p in pool.pools.values())  # one block of every layer, K and V
    shared = (hits[-1] - sinks) // caches[0].cache_config.block_size * per_block if hits[-1] else 0
    return {
        "seconds": seconds,
        "computed": computed,
        "hit_tokens": hits,
        "held_bytes": held_total,
        "shared_bytes": shared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--prefix", type=int, default=3000)
    parser.add_argument("--private", type=int, default=100)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=Path("results/prefix_sharing.json"))
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", attn_implementation="kvsqueeze")
    need = args.prefix + args.sequences * args.private
    ids = tokenize_text(tokenizer, load_text(args.text_file))[:need][None]
    prefix = ids[:, : args.prefix]
    privates = [
        ids[:, args.prefix + i * args.private : args.prefix + (i + 1) * args.private]
        for i in range(args.sequences)
    ]

    def alone(tokens: torch.Tensor) -> int:
        cache = SqueezedCache.from_model(model, args.preset)
        prefill(model, cache, tokens, args.chunk)
        return cache.nbytes()

    prefix_bytes = alone(prefix)
    first_bytes = alone(torch.cat([prefix, privates[0]], dim=1))
    naive = first_bytes + (args.sequences - 1) * (first_bytes - prefix_bytes)
    runs = [one_run(model, args.preset, prefix, privates, args.chunk) for _ in range(args.repeats)]
    expected = first_bytes + (args.sequences - 1) * (first_bytes - runs[-1]["shared_bytes"])
    first = statistics.median(r["seconds"][0] for r in runs)
    later = [statistics.median(r["seconds"][i] for r in runs) for i in range(1, args.sequences)]
    speedup = first / statistics.median(later)
    ratio = runs[-1]["held_bytes"] / expected

    table = Table(
        title=f"{args.sequences} sequences x ({args.prefix} shared + {args.private} private), {args.preset}"
    )
    for col in (
        "sequence",
        "prefix tokens taken",
        "tokens computed",
        "prefill s (median)",
        "speed-up vs 1st",
    ):
        table.add_column(col, justify="right")
    for i in range(args.sequences):
        s = statistics.median(r["seconds"][i] for r in runs)
        table.add_row(
            str(i + 1),
            str(runs[-1]["hit_tokens"][i]),
            str(runs[-1]["computed"][i]),
            f"{s:.3f}",
            f"{first / s:.1f}x",
        )
    console.print(table)
    console.print(
        f"held bytes: pool + caches {runs[-1]['held_bytes']:,} vs one prefix + {args.sequences} private parts "
        f"{expected:,} (sequence alone {first_bytes:,}, of it shared {runs[-1]['shared_bytes']:,}) -> {ratio:.3f}x; "
        f"vs prefix alone + {args.sequences} x (prefix + private - prefix) {naive:,} -> "
        f"{runs[-1]['held_bytes'] / naive:.3f}x"
    )
    config = vars(args) | {"text_file": str(args.text_file), "out": str(args.out)}
    results = {
        "held_bytes_ratio": ratio,
        "held_bytes": runs[-1]["held_bytes"],
        "expected_bytes": expected,
        "naive_expected_bytes": naive,
        "naive_ratio": runs[-1]["held_bytes"] / naive,
        "sequence_alone_bytes": first_bytes,
        "prefix_alone_bytes": prefix_bytes,
        "first_prefill_s": first,
        "later_prefill_s": later,
        "prefill_speedup": speedup,
        "computed_tokens": runs[-1]["computed"],
        "runs": runs,
    }
    save_results(args.out, config, results)
    print(
        json.dumps(
            {
                "held_bytes_ratio": round(ratio, 4),
                "prefill_speedup": round(speedup, 2),
                "saved": str(args.out),
            }
        )
    )


if __name__ == "__main__":
    main()
