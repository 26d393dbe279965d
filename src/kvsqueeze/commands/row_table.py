"""Result tables that fit the terminal: cells never wrap and the method column is never cut; when
the columns are wider than the terminal they are dealt over several tables, each led by the
method column."""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import common

PIPE_WIDTH = 160
"""Width of the tables when stdout is not a terminal (files, pipes)."""


def method_label(name: str, warning: str | None) -> str:
    """The method's name, marked ``(!)`` when its row carries a warning."""
    return name + (" (!)" if warning else "")


def column_groups(widths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of the columns after the first, dealt in order into groups that fit ``width`` cells
    together with the first column (each column takes its widest cell plus 3: padding, border)."""
    groups: list[list[int]] = [[]]
    used = widths[0] + 4
    for index in range(1, len(widths)):
        if groups[-1] and used + widths[index] + 3 > width:
            groups.append([])
            used = widths[0] + 4
        groups[-1].append(index)
        used += widths[index] + 3
    return groups


def print_rows(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` (strings, the method first) under ``columns`` to stdout, in as many tables as
    the terminal's width needs (:data:`PIPE_WIDTH` when stdout is a file or a pipe)."""
    console = common.out if common.out.is_terminal else Console(width=PIPE_WIDTH)
    widths = [max(cell_len(column), *(cell_len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    for number, group in enumerate(column_groups(widths, console.width)):
        table = Table(title=title if number == 0 else None)
        table.add_column(columns[0], no_wrap=True)
        for index in group:
            table.add_column(columns[index], justify="right", no_wrap=True)
        for row in rows:
            table.add_row(row[0], *(row[index] for index in group))
        console.print(table)


def print_warnings(rows: Sequence[dict]) -> None:
    """Each distinct ``warning`` of ``rows`` as one line on stderr."""
    for warning in dict.fromkeys(row["warning"] for row in rows if row.get("warning")):
        common.console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
