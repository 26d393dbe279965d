"""Repeatability of `kvsqueeze bench`: two result files of the same grid, side by side.

    kvsqueeze bench ... --out results/run1.json && kvsqueeze bench ... --out results/run2.json
    python benchmarks/compare_runs.py results/run1.json results/run2.json [--tolerance 0.10]

For every (method, batch, context) cell present in both runs: TTFT, TPOT and decode tokens/s of
each run (medians) and their relative difference ``run2 / run1 - 1``. Prints a table, the share of
cells within ``--tolerance``, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

METRICS = ("ttft_s", "tpot_s", "decode_tokens_per_s")


def cells(path: str) -> tuple[dict, dict]:
    data = json.loads(Path(path).read_text())
    rows = data["results"]["rows"] if isinstance(data["results"], dict) else data["results"]
    return data["config"], {(r["method"], r["batch_size"], r["context"]): r for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run1")
    parser.add_argument("run2")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference")
    args = parser.parse_args(argv)
    config1, rows1 = cells(args.run1)
    config2, rows2 = cells(args.run2)
    shared = [key for key in rows1 if key in rows2]
    if not shared:
        raise SystemExit(f"{args.run1} and {args.run2} share no (method, batch, context) cell")
    table = Table(title=f"run 2 / run 1 - 1 (tolerance ±{args.tolerance:.0%})")
    for col in ("method", "batch", "context", "TTFT s 1 → 2", "TPOT ms 1 → 2", "decode tok/s 1 → 2"):
        table.add_column(col, justify="right")
    scale = {"ttft_s": 1.0, "tpot_s": 1000.0, "decode_tokens_per_s": 1.0}
    out, within = [], {m: 0 for m in METRICS}
    for key in shared:
        a, b = rows1[key], rows2[key]
        diffs = {m: b[m] / a[m] - 1 for m in METRICS}
        for m in METRICS:
            within[m] += abs(diffs[m]) <= args.tolerance
        table.add_row(
            key[0],
            str(key[1]),
            str(key[2]),
            *(f"{a[m] * scale[m]:.3g} → {b[m] * scale[m]:.3g} ({diffs[m]:+.0%})" for m in METRICS),
        )
        out.append(
            {
                "method": key[0],
                "batch_size": key[1],
                "context": key[2],
                "run1": {m: a[m] for m in METRICS},
                "run2": {m: b[m] for m in METRICS},
                "rel_diff": diffs,
            }
        )
    console = Console()
    console.print(table)
    summary = {m: f"{within[m]}/{len(shared)}" for m in METRICS}
    console.print(f"cells within ±{args.tolerance:.0%}: " + ", ".join(f"{m} {s}" for m, s in summary.items()))
    print(
        json.dumps(
            {
                "benchmark": "compare_runs",
                "config": {"run1": config1, "run2": config2, "tolerance": args.tolerance},
                "cells": out,
                "within": summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
