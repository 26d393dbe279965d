"""What `kvsqueeze bench` prints and draws: the speed and capacity tables, the speed figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .common import console

MIB = 2**20


def speed_table(rows: list[dict], config: Any) -> Table:
    """One row per grid cell (medians); spread = (max - min) / median of the TPOT runs."""
    table = Table(
        title=f"kvsqueeze bench — {config.model} ({config.dtype}), {config.new_tokens} new tokens, "
        f"median of {config.repeats}"
    )
    for col in (
        "method",
        "batch",
        "context",
        "TTFT s",
        "TPOT ms",
        "spread",
        "decode tok/s",
        "prefill tok/s",
        "KV MiB",
        "peak RSS + MiB",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
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
    """One row per method and batch size: longest context, bytes allocated vs predicted, +1 token."""
    table = Table(title=f"Longest context whose KV cache fits {budget} — {model} ({dtype})")
    for col in ("method", "batch", "max context", "allocated", "predicted", "of budget", "+1 token", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["method"], str(r["batch_size"]), "-", "-", "-", "-", "-", r["skipped"])
            continue
        same = "=" if r["predicted_bytes"] == r["allocated_bytes"] else "≠"
        nxt = r["next_allocated_bytes"]
        note = f"capped by max_position_embeddings {r['max_position_embeddings']}" if r["capped"] else ""
        table.add_row(
            r["method"],
            str(r["batch_size"]),
            f"{r['max_context']:,}",
            f"{r['allocated_bytes']:,}",
            f"{same} {r['predicted_bytes']:,}",
            f"{r['allocated_bytes'] / r['budget_bytes']:.1%}",
            "-" if nxt is None else f"{nxt:,} ({'exceeds' if nxt > r['budget_bytes'] else 'FITS'})",
            note,
        )
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
    console.print(f"wrote {path}")
