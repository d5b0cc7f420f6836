"""A DataTable that has its columns whenever rows are added to it.

Why: a screen's resume can reload its table before the screen's on_mount has added the columns
(seen with Textual 8 under load), and adding a row to a table without columns raises. Screens call
``columned`` wherever they fill a table instead of adding the columns once in on_mount.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.widgets import DataTable


def columned(table: DataTable, columns: Sequence[str]) -> DataTable:
    """``table``, after adding ``columns`` if it has none yet."""
    if not table.columns:
        table.add_columns(*columns)
    return table
