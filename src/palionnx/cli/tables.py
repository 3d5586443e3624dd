"""Tables on stdout: drawn by rich on a terminal, plain aligned text otherwise (logs, pipes, scripts)."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console
from rich.table import Table


def human_bytes(count: float) -> str:
    """1234567 -> "1.2 MB"; gigabytes and up with one decimal."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def print_table(columns: list[str], rows: list[list[str]], title: str | None = None,
                stream: IO[str] | None = None) -> None:
    """Columns after the first are numbers or short values: right-aligned."""
    console = Console(file=stream or sys.stdout, highlight=False, markup=False)
    if console.is_terminal:
        table = Table(*columns, title=title, title_justify="left")
        for column in table.columns[1:]:
            column.justify = "right"
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    out = stream or sys.stdout
    if title:
        out.write(title + "\n")
    cells = [columns, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        out.write("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                  + "\n")


def print_pairs(pairs: list[tuple[str, str]], stream: IO[str] | None = None) -> None:
    """A two-column listing (name, value): `palionnx info` and `palionnx doctor`."""
    console = Console(file=stream or sys.stdout, highlight=False, markup=False, soft_wrap=False)
    if console.is_terminal:
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in pairs:
            table.add_row(name, value)
        console.print(table)
        return
    out = stream or sys.stdout
    width = max((len(name) for name, _ in pairs), default=0)
    for name, value in pairs:
        out.write(f"{name.ljust(width)}  {value}\n")
