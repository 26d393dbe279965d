"""PNG figures of the evaluation results, drawn with matplotlib's object API (no pyplot, no global state).

matplotlib is optional (``pip install kvsqueeze[plot]``); it is imported only when a figure is drawn and
:func:`plots_available` tells the CLI whether to skip the figure.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plots_available() -> tuple[bool, str]:
    """Whether matplotlib is installed, and the message to print when it is not."""
    if importlib.util.find_spec("matplotlib") is None:
        return False, "plot: skipped, matplotlib is not installed (pip install matplotlib)"
    return True, ""


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_quality(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """ΔPPL % and KL(exact || method) per method against bits per element (bytes per token on top).

    Args:
        rows: `evaluate_quality` rows (``method``, ``bits_per_element``, ``bytes_per_token``,
            ``delta_ppl_pct``, ``kld_mean``, ``kld_p99``).
    """
    figure = _figure(11, 4.2)
    ppl_axes, kld_axes = figure.subplots(1, 2)
    bytes_per_bit = rows[0]["bytes_per_token"] / rows[0]["bits_per_element"]
    for row in rows:
        bits = row["bits_per_element"]
        ppl_axes.scatter(bits, row["delta_ppl_pct"], color="tab:blue")
        ppl_axes.annotate(
            row["method"], (bits, row["delta_ppl_pct"]), textcoords="offset points", xytext=(4, 4)
        )
        if row["kld_mean"] is not None:
            kld_axes.scatter(bits, max(row["kld_mean"], 1e-9), color="tab:red")
            kld_axes.scatter(bits, max(row["kld_p99"], 1e-9), color="tab:red", marker="^", facecolors="none")
            kld_axes.annotate(
                row["method"], (bits, row["kld_mean"]), textcoords="offset points", xytext=(4, 4)
            )
    ppl_axes.axhline(0.0, color="grey", linewidth=0.8)
    ppl_axes.set_ylabel("ΔPPL vs exact cache (%)")
    kld_axes.set_yscale("log")
    kld_axes.set_ylabel("KL(exact || method), nats  (● mean, △ p99)")
    for axes in (ppl_axes, kld_axes):
        axes.set_xlabel("stored bits per K/V element")
        axes.grid(alpha=0.3)
        top = axes.secondary_xaxis(
            "top", functions=(lambda b: b * bytes_per_bit, lambda y: y / bytes_per_bit)
        )
        top.set_xlabel("KV bytes per token")
    figure.suptitle(title or "KV cache quality vs size")
    return _save(figure, path)


def plot_retrieval(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One heat map per method (rows: prompt length, columns: key depth), cells are accuracy.

    Args:
        rows: `evaluate_retrieval` rows (``method``, ``length``, ``depth``, ``accuracy``).
    """
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lengths = sorted({row["length"] for row in rows})
    depths = sorted({row["depth"] for row in rows})
    figure = _figure(1.2 + 0.9 * len(depths) * len(methods) + 0.6, 1.4 + 0.5 * len(lengths))
    panels = figure.subplots(1, len(methods), squeeze=False)[0]
    accuracy = {(row["method"], row["length"], row["depth"]): row["accuracy"] for row in rows}
    image = None
    for axes, method in zip(panels, methods, strict=True):
        grid = [[accuracy[(method, n, d)] for d in depths] for n in lengths]
        image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                axes.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        axes.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        axes.set_xlabel("key depth")
        axes.set_title(method)
    panels[0].set_ylabel("prompt tokens")
    figure.colorbar(image, ax=list(panels), label="accuracy")
    figure.suptitle(title or "retrieval accuracy")
    return _save(figure, path)
