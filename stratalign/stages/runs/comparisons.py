"""Paired comparisons of finished runs: gather each run's per-query results (recomputed from its weights
where a run lacks them) and hand them to report.compare, which bootstraps the differences and each cell's mean."""

from __future__ import annotations

import polars as pl

from stratalign.core.stats import DEFAULT_RESAMPLES
from stratalign.report.compare import cell_intervals, paired_comparisons
from stratalign.stages.runs.evaluate import run_queries
from stratalign.store.feature_store import FeatureStore


def compare_runs(store: FeatureStore, runs: pl.DataFrame, *, baseline: str = "clip", baseline_rule: str = "last",
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, float | None]:
    """(paired comparisons of the runs against `baseline` and `baseline_rule`, every cell's mean with its
    interval, the majority-class rate in % of their test split or None without labels). `runs` needs the columns
    run, objective, head, layer_rule, n_pairs, seed (stages.runs.sweep.run_table)."""
    queries, majority = {}, None
    for rid in runs["run"].to_list():
        got = run_queries(store, rid)
        if got is None:
            continue
        queries[rid] = got[0]
        if "zs_majority" in got[1]:
            majority = float(got[1]["zs_majority"])
    table = paired_comparisons(runs, queries, baseline=baseline, baseline_rule=baseline_rule,
                               resamples=resamples, seed=seed)
    intervals = cell_intervals(runs, queries, resamples=resamples, seed=seed)
    return table, intervals, majority
