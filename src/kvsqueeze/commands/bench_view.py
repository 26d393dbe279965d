"""What `kvsqueeze bench` prints and draws: the speed and capacity tables, the speed figure.

Tables fit the terminal without cutting a number or a method name: numbers never wrap, and the
method column takes the width left (long names fold onto more lines, at least `MIN_METHOD_WIDTH`
columns; when even that does not fit, the table is printed wider than the terminal, uncut).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .common import console, out

MIB = 2**20
MIN_METHOD_WIDTH = 12
FILE_WIDTH = 160  # columns of a table printed to a file or a pipe


def new_table(title: str, columns: list[str]) -> Table:
    """A compact table; the first column (method) folds, the others (numbers) never wrap."""
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=0)
    table.add_column(columns[0], overflow="fold")
    for name in columns[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def print_fitted(table: Table, width: int | None = None) -> None:
    """Print ``table`` to stdout at ``width`` columns (the terminal's; `FILE_WIDTH` for a file), its
    first column narrowed to what is left, never below `MIN_METHOD_WIDTH` nor cut."""
    width = width or (out.width if out.is_terminal else FILE_WIDTH)
    wide = Console(width=10_000)
    method = table.columns[0]
    natural = Measurement.get(wide, wide.options, table).maximum
    method.width = 1
    others = Measurement.get(wide, wide.options, table).maximum - 1
    method.width = max(min(natural - others, width - others), min(natural - others, MIN_METHOD_WIDTH))
    needed = max(width, others + method.width)
    (out if out.is_terminal and needed <= out.width else Console(width=needed)).print(table)


def speed_table(rows: list[dict], config: Any) -> Table:
    """One row per grid cell (medians); spread = (max - min) / median of the TPOT runs."""
    table = new_table(
        f"kvsqueeze bench — {config.model} ({config.dtype}), {config.new_tokens} new tokens, "
        f"median of {config.repeats}",
        [
            "method",
            "batch",
            "context",
            "TTFT\ns",
            "TPOT\nms",
            "spread",
            "decode\ntok/s",
            "prefill\ntok/s",
            "KV\nMiB",
            "RSS +\nMiB",
        ],
    )
    for r in rows:
        runs = r["tpot_s_runs"]
        spread = (max(runs) - min(runs)) / r["tpot_s"]
        table.add_row(
            r["method"],
            str(r["batch_size"]),
            str(r["context"]),
            f"{r['ttft_s']:.2f}",
            f"{1000 * r['tpot_s']:.1f}",
            f"{spread:.0%}",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['kv_bytes'] / MIB:.1f}",
            f"{r['peak_rss_growth_bytes'] / MIB:.0f}",
        )
    return table


def capacity_table(rows: list[dict], budget: str, model: str, dtype: str) -> Table:
    """One row per method and batch size: longest context, bytes allocated vs predicted, +1 token.
    A context capped by the model's limit is marked ``(cap)``; skipped methods show ``skipped``."""
    table = new_table(
        f"Longest context whose KV cache fits {budget} — {model} ({dtype})",
        [
            "method",
            "batch",
            "max\ncontext",
            "allocated\nbytes",
            "predicted\nbytes",
            "of\nbudget",
            "+1 token\nbytes",
        ],
    )
    capped = None
    for r in rows:
        if "skipped" in r:
            table.add_row(r["method"], str(r["batch_size"]), "skipped", "-", "-", "-", "-")
            continue
        same = "=" if r["predicted_bytes"] == r["allocated_bytes"] else "≠"
        nxt = r["next_allocated_bytes"]
        if r["capped"]:
            capped = r["max_position_embeddings"]
        table.add_row(
            r["method"],
            str(r["batch_size"]),
            f"{r['max_context']:,}" + (" (cap)" if r["capped"] else ""),
            f"{r['allocated_bytes']:,}",
            f"{same} {r['predicted_bytes']:,}",
            f"{r['allocated_bytes'] / r['budget_bytes']:.1%}",
            "-" if nxt is None else f"{nxt:,} ({'exceeds' if nxt > r['budget_bytes'] else 'FITS'})",
        )
    if capped is not None:
        table.caption = f"(cap): the model's context, {capped:,} tokens, is reached within the budget"
    return table


def plot_speed(rows: list[dict], path: Path, title: str) -> None:
    """PNG: decode tokens/s (top) and KV MiB (bottom) vs context, one line per method, a column per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7), squeeze=False)
    for col, batch in enumerate(batches):
        for method in methods:
            cell = sorted(
                (r for r in rows if r["batch_size"] == batch and r["method"] == method),
                key=lambda r: r["context"],
            )
            x = [r["context"] for r in cell]
            axes[0, col].plot(x, [r["decode_tokens_per_s"] for r in cell], marker="o", label=method)
            axes[1, col].plot(x, [r["kv_bytes"] / MIB for r in cell], marker="o", label=method)
        axes[0, col].set_title(f"batch {batch}")
        axes[0, col].set_ylabel("decode tokens/s")
        axes[1, col].set_ylabel("KV cache MiB held")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (prompt tokens)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"saved the figure to {path}")
