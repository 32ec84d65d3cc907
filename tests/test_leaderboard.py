"""Leaderboard aggregation over seeds."""

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
    assert single["seeds"] == 1 and single["i2t_R@1_std"] == 0.0 and single["best_step_mean"] == 6
    assert board.height == 3 and "seed_mean" not in board.columns


def test_findings_say_where_a_method_does_not_help() -> None:
    from stratalign.report.report import findings, layer_rule_finding

    runs = pl.DataFrame({
        "objective": ["clip"] * 4 + ["clip+structure"] * 4 + ["clip+ib"] * 4,
        "head": ["linear"] * 12, "layer_rule": (["last"] * 2 + ["auto"] * 2) * 3, "n_pairs": [100] * 12,
        "seed": [0, 1] * 6,
        "zs_top1": [40.0, 42.0, 40.0, 42.0, 20.0, 22.0, 20.0, 22.0, 40.5, 41.5, 40.5, 41.5],
    })
    board = aggregate(runs)
    text = " ".join(findings(board, metric="zs_top1"))
    assert "**clip+structure** vs clip on zs_top1: hurts" in text
    assert "**clip+ib** vs clip on zs_top1: does not clearly help" in text
    assert "no clear difference" in layer_rule_finding(board, "zs_top1")
