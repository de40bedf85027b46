"""Cells and tables of the command line's output: numbers, collectives, rich tables.

Pure formatting, no terminal: :func:`format_column` (one column of cells, floats
lined up), :func:`format_value`, :func:`format_collectives` (``op@axes:count``
in a fixed order) and :func:`rich_tables` (rows of dicts as tables split to a
width, no column ever dropped). Printing them (the console, :func:`print_table`,
:func:`print_text`, :func:`progress_bar`) is in :mod:`attention_jax.cli`, which
re-exports every name here. No JAX is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

COLLECTIVE_ORDER = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all",
                    "collective-permute")
AXIS_ORDER = ("model", "data")


def _collective_key(name: str) -> tuple:
    op, _, axes = name.partition("@")
    op_rank = COLLECTIVE_ORDER.index(op) if op in COLLECTIVE_ORDER else len(COLLECTIVE_ORDER)
    axis_ranks = tuple(AXIS_ORDER.index(a) if a in AXIS_ORDER else len(AXIS_ORDER)
                       for a in axes.split(","))
    return op_rank, op, len(axis_ranks), axis_ranks, axes


def format_collectives(summary: Mapping[str, int]) -> str:
    """Collective counts as one cell, in a fixed order; ``"none"`` when there are none.

    Every subcommand writes collectives this way (``op@axes:count``, comma separated,
    ordered by op as in ``COLLECTIVE_ORDER``, then by axes, ``model`` before ``data``).

    >>> format_collectives({"all-reduce@data": 1, "all-gather@model": 2,
    ...                     "all-reduce@model": 1})
    'all-reduce@model:1, all-reduce@data:1, all-gather@model:2'
    >>> format_collectives({})
    'none'
    """
    return ", ".join(f"{k}:{summary[k]}" for k in sorted(summary, key=_collective_key)) or "none"


def format_value(value: object) -> str:
    """One cell on its own: ``None`` -> ``n/a``, floats as :func:`format_column` would.

    >>> [format_value(v) for v in (None, 3, 0.5, 123.456, 6.48e-07)]
    ['n/a', '3', '0.50', '123', '6.48e-07']
    """
    return format_column([value])[0]


SMALL = 1e-3  # a column holding a nonzero |value| below this is written in e-notation


def format_column(values: Sequence[object]) -> list[str]:
    """The cells of one column, floats in one format so that they line up and compare.

    ``None`` -> ``n/a``; other non-floats -> ``str``. Floats: when some nonzero
    one is below ``SMALL`` in magnitude (errors), all in e-notation with 3
    significant digits; otherwise all with the same number of decimals, enough
    for 2 significant digits of the smallest nonzero magnitude (0 to 3 decimals).

    >>> format_column([0.07, 0.00648, 1.5])
    ['0.070', '0.006', '1.500']
    >>> format_column([120.3, 3.42, None])
    ['120.3', '3.4', 'n/a']
    >>> format_column([0.0, 1.19e-07, 0.03])
    ['0.00e+00', '1.19e-07', '3.00e-02']
    >>> format_column([2048.0, 512.0])
    ['2048', '512']
    """
    floats = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    nonzero = [v for v in floats if v > 0]
    scientific = any(v < SMALL for v in nonzero)
    if nonzero and not scientific:
        decimals = min(3, max(0, 1 - math.floor(math.log10(min(nonzero)))))
    else:
        decimals = 2
    cells = []
    for v in values:
        if v is None:
            cells.append("n/a")
        elif isinstance(v, float):
            cells.append(f"{v:.2e}" if scientific else f"{v:.{decimals}f}")
        else:
            cells.append(str(v))
    return cells


def _is_numeric(values: Sequence[object]) -> bool:
    return all((isinstance(v, int | float) and not isinstance(v, bool)) or v is None
               for v in values)


def _table(rows: Sequence[dict], columns: Sequence[str], cells: dict[str, list[str]],
           numeric: dict[str, bool], *, title: str | None, caption: str | None) -> Table:
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
                  caption_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if numeric[col] else "left",
                         no_wrap=numeric[col], overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(cells[col][i] for col in columns))
    return table


def rich_tables(rows: Sequence[dict], *, title: str | None = None, caption: str | None = None,
                width: int | None = None, key_columns: int = 1) -> list[Table]:
    """Rows of dicts (the first row's keys are the columns) as tables no wider than ``width``.

    No column is ever dropped or cut: when the whole table is wider than
    ``width``, the columns are split into stacked tables, each repeating the first
    ``key_columns`` columns (what names a row, e.g. the variant) so every row stays
    readable; the title goes on the first table, the caption under the last. One
    table when ``width`` is None or the table fits.
    """
    columns = list(rows[0]) if rows else []
    cells = {col: format_column([r.get(col) for r in rows]) for col in columns}
    numeric = {col: _is_numeric([r.get(col) for r in rows]) for col in columns}
    whole = _table(rows, columns, cells, numeric, title=title, caption=caption)
    if width is None or not columns:
        return [whole]
    measuring = Console(width=10_000)

    def table_width(cols) -> int:
        return measuring.measure(_table(rows, cols, cells, numeric, title=None,
                                        caption=None)).maximum

    if table_width(columns) <= width:
        return [whole]
    keys = columns[:key_columns]
    groups: list[list[str]] = [list(keys)]
    for col in columns[key_columns:]:
        if len(groups[-1]) > len(keys) and table_width([*groups[-1], col]) > width:
            groups.append(list(keys))
        groups[-1].append(col)
    return [_table(rows, group, cells, numeric, title=title if i == 0 else None,
                   caption=caption if i == len(groups) - 1 else None)
            for i, group in enumerate(groups)]


def rich_table(rows: Sequence[dict], *, title: str | None = None,
               caption: str | None = None) -> Table:
    """Rows of dicts (the first row's keys are the columns) as one rich table."""
    return rich_tables(rows, title=title, caption=caption)[0]
