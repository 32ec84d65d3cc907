"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from stratalign.store.location import STORE_ENV, default_store_url


def _console(stderr: bool = False) -> Console:
    """A console; when output is not a terminal (CI, files) use a wide page so tables stay readable."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=220)


console = _console()
err_console = _console(stderr=True)

StoreOption = typer.Option(
    None, "--store", envvar=STORE_ENV, help="Store URL or path (default ./stratalign-store; env STRATALIGN_STORE)."
)


def store_url(value: str | None) -> str:
    return value or default_store_url()


def print_table(frame: pl.DataFrame, title: str | None = None) -> None:
    """Render a polars frame as a rich table (floats to 2 decimals)."""
    table = Table(title=title, show_lines=False)
    for col in frame.columns:
        table.add_column(col, overflow="fold")
    for row in frame.iter_rows():
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row])
    console.print(table)
