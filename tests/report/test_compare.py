"""report.compare.grid_differences: one grid run two ways (e.g. bf16 against fp32), paired run by run on
(cell, seed), with the two-level interval of B - A per cell and metric."""

from __future__ import annotations

import numpy as np
import polars as pl

from stratalign.report.compare import grid_differences

ROWS = np.arange(40)


def _grid(prefix: str, seeds: int = 3) -> pl.DataFrame:
    return pl.DataFrame([{"run": f"{prefix}-{obj}-{s}", "objective": obj, "layer_rule": "auto", "head": "linear",
                          "n_pairs": None, "seed": s} for obj in ("clip", "csa") for s in range(seeds)],
                        schema_overrides={"n_pairs": pl.Int64})


def _queries(run: str, hits: np.ndarray) -> dict[str, np.ndarray]:
    return {"i2t_R@1": hits.astype(float), "image_rows": ROWS}


def test_identical_grids_differ_by_nothing_and_a_real_gap_is_resolved() -> None:
    rng = np.random.default_rng(0)
    a, b = _grid("a"), _grid("b", seeds=2)  # b lacks seed 2: paired on what both have
    queries = {}
    for r in a.iter_rows(named=True):
        queries[r["run"]] = _queries(r["run"], rng.random(40) < 0.3)
    for r in b.iter_rows(named=True):
        twin = queries[r["run"].replace("b-", "a-", 1)]["i2t_R@1"]
        queries[r["run"]] = _queries(r["run"], twin if r["objective"] == "clip" else np.ones(40))
    table = grid_differences(b, a, queries, metrics=("i2t_R@1",), resamples=1000)
    assert table.height == 2 and (table["seeds"] == 2).all()
    same = table.filter(pl.col("objective") == "clip").row(0, named=True)
    assert same["diff"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0 and same["verdict"] == "no clear difference"
    gap = table.filter(pl.col("objective") == "csa").row(0, named=True)
    a_mean = np.mean([queries[f"a-csa-{s}"]["i2t_R@1"].mean() for s in range(2)])
    assert np.isclose(gap["diff"], 100 * (1 - a_mean)) and gap["low"] > 0 and gap["verdict"] == "helps"
