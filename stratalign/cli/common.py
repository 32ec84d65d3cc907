"""Options and output helpers shared by the CLI commands.

Every `stratalign ... --help` imports this module: keep its imports light (no polars, zarr, torch, faiss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import typer
from rich.console import Console

if TYPE_CHECKING:
    import polars as pl


def _console(stderr: bool = False) -> Console:
    """On a terminal: rich output fitted to its width. Elsewhere (pipes, files, CI): lines are never wrapped,
    so each message stays one line for grep and friends."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, soft_wrap=True)


console = _console()
err_console = _console(stderr=True)

# = stratalign.store.location.STORE_ENV, spelt out so that `--help` does not import the store (fsspec);
# tests/cli/test_main.py checks that the two agree
STORE_ENV = "STRATALIGN_STORE"

FeaturePrecisionOption = typer.Option(
    None, "--feature-precision", metavar="fp32|bf16",
    help="Read the features of this forward precision (`extract --precision`); default: fp32 ones first.")
StoreOption = typer.Option(
    None, "--store", envvar=STORE_ENV, metavar="URL", help="Store URL or path (default ./stratalign-store; env STRATALIGN_STORE)."
)


def store_url(value: str | None) -> str:
    """The --store given, else $STRATALIGN_STORE, else ./stratalign-store."""
    from stratalign.store.location import default_store_url

    return value or default_store_url()


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))


def plain_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no box drawing; an empty cell shows as '-' so that splitting a
    line on whitespace keeps every column in place."""
    lines = [list(header)] + [[" ".join(c.split()) or "-" for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def print_table(frame: pl.DataFrame, title: str | None = None, no_wrap: Sequence[str] = ()) -> None:
    """Print a polars frame (floats to 2 decimals): on a terminal a rich table folded to fit its width (the
    `no_wrap` columns, e.g. ids, kept whole), otherwise the title line and plain aligned columns."""
    rows = [[_cell(v) for v in row] for row in frame.iter_rows()]
    if not console.is_terminal:
        console.out((f"{title}\n" if title else "") + plain_columns(frame.columns, rows), highlight=False)
        return
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in frame.columns:
        table.add_column(col, overflow="fold", no_wrap=col in no_wrap)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_metrics(res: dict) -> None:
    """A run's headline metrics, then how the checkpoint was chosen (the trainer's message, warm-up warnings)."""
    from stratalign.core.metric_registry import RUN, TRAINING, metric, shown_in

    shown = shown_in(RUN)  # the registry's metrics of one run's line: how training ended first, then the scores
    keys = [k for k in sorted(shown, key=lambda k: metric(k).split != TRAINING) if k in res]
    console.print("  " + "  ".join(f"{k}={res[k]:.2f}" if isinstance(res[k], float) else f"{k}={res[k]}" for k in keys))
    if res.get("message"):
        console.print(f"  {res['message']}", highlight=False, markup=False, soft_wrap=True)
    if res.get("restored_before_warmup"):
        console.print("  restored_before_warmup=True: the restored heads are from inside the lambda warm-up "
                      "(the regulariser was not at full strength)", highlight=False, soft_wrap=True)
    for name in ("probe_baselines",):
        if name in res:
            console.print(f"  {name}: {res[name]}")
