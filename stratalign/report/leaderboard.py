"""Sweep leaderboards: every metric of every cell, as mean and std over seeds (no std with one seed)."""

from __future__ import annotations

from typing import Sequence

import polars as pl

CELL_COLUMNS = ("objective", "head", "layer_rule", "n_pairs")


def metric_columns(frame: pl.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """Numeric result columns (recalls, accuracies, ...), not the cell description or the seed."""
    skip = set(CELL_COLUMNS) | {"seed"} | set(exclude)
    return [c for c, t in frame.schema.items() if c not in skip and t.is_numeric()]


def aggregate(runs: pl.DataFrame, by: Sequence[str] = CELL_COLUMNS,
              metrics: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per cell: `<metric>_mean`, `<metric>_std` (sample std; null with one seed: there is no spread)
    and `seeds`."""
    metrics = list(metrics) if metrics is not None else metric_columns(runs, exclude=by)
    aggs = [pl.len().alias("seeds")]
    for m in metrics:
        aggs += [pl.col(m).mean().alias(f"{m}_mean"), pl.col(m).std(ddof=1).alias(f"{m}_std")]
    return runs.group_by(list(by), maintain_order=True).agg(aggs).sort(list(by), nulls_last=True)
