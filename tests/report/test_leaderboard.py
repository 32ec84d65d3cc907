"""Leaderboard aggregation over seeds (the verdicts are tested in tests/core/test_stats.py)."""

from __future__ import annotations

import numpy as np
import polars as pl

from stratalign.report.leaderboard import aggregate


def test_mean_std_over_seeds() -> None:
    runs = pl.DataFrame({
        "objective": ["clip", "clip", "clip", "clip+structure", "clip"],
        "head": ["linear"] * 5,
        "layer_rule": ["last"] * 5,
        "n_pairs": [100, 100, 100, 100, 200],
        "seed": [0, 1, 2, 0, 0],
        "i2t_R@1": [10.0, 20.0, 30.0, 50.0, 40.0],
        "best_step": [3, 4, 5, 6, 7],
    })
    board = aggregate(runs)
    row = board.filter((pl.col("objective") == "clip") & (pl.col("n_pairs") == 100)).row(0, named=True)
    assert row["seeds"] == 3 and row["i2t_R@1_mean"] == 20.0
    assert np.isclose(row["i2t_R@1_std"], np.std([10, 20, 30], ddof=1))
    single = board.filter(pl.col("objective") == "clip+structure").row(0, named=True)
    assert single["seeds"] == 1 and single["i2t_R@1_std"] is None and single["best_step_mean"] == 6
    assert board.height == 3 and "seed_mean" not in board.columns
