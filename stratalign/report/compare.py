"""Paired comparisons of sweep cells against a named baseline, from the runs' per-query results.

Two kinds of comparison, both paired run by run (same n_pairs, same seed, same test queries):
- objectives: each objective against `baseline` (default CLIP) with the same layer rule, head, n_pairs and
  seed (an objective with its own head, e.g. CSA, is compared with the baseline's linear head);
- layer rules: each rule against `baseline_rule` (default the last layers) with the same objective, head,
  n_pairs and seed.
The interval and verdict come from core.stats.paired_bootstrap (METHOD.md section 4); nothing else decides
"helps" or "hurts".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from stratalign.core.metric_registry import VERDICT, query_units, shown_in
from stratalign.core.stats import DEFAULT_RESAMPLES, paired_bootstrap

KEY_METRICS = shown_in(VERDICT)  # core.metric_registry
QUERY_UNIT = query_units()
Queries = Mapping[str, Mapping[str, np.ndarray]]  # run id -> per-query arrays


def _pairs(runs: pl.DataFrame, vary: str, baseline: str, match: Sequence[str]) -> dict[tuple, list[tuple[str, str]]]:
    """{(vary value, *cell of the method): [(method run, baseline run) per shared seed]}."""
    rows = list(runs.iter_rows(named=True))
    base = {tuple(r[c] for c in (*match, "seed", "head")): r["run"] for r in rows if r[vary] == baseline}
    out: dict[tuple, list[tuple[str, str]]] = {}
    for r in rows:
        if r[vary] == baseline:
            continue
        key = tuple(r[c] for c in (*match, "seed"))
        partner = base.get((*key, r["head"])) or base.get((*key, "linear"))
        if partner is not None:
            out.setdefault((r[vary], r["head"], *(r[c] for c in match)), []).append((r["run"], partner))
    return out


def _same_queries(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str) -> bool:
    rows = "caption_rows" if metric.startswith("t2i") else "image_rows"
    return metric in a and metric in b and np.array_equal(a[rows], b[rows])


def _compare(kind: str, vary: str, baseline: str, match: Sequence[str], runs: pl.DataFrame, queries: Queries,
             metrics: Sequence[str], resamples: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for (value, head, *cell), pairs in _pairs(runs, vary, baseline, match).items():
        pairs = [(m, b) for m, b in pairs if m in queries and b in queries]
        for metric in metrics:
            usable = [(m, b) for m, b in pairs if _same_queries(queries[m], queries[b], metric)]
            if not usable:
                continue
            res = paired_bootstrap([queries[m][metric] for m, _ in usable], [queries[b][metric] for _, b in usable],
                                   resamples=resamples, seed=seed)
            out.append({"comparison": kind, "method": value, "baseline": baseline, "head": head,
                        **dict(zip(match, cell)), vary: value, "metric": metric, "seeds": res.seeds, "queries": res.queries,
                        "query_unit": QUERY_UNIT.get(metric, "queries"), "diff": res.diff,
                        "low": res.low, "high": res.high, "verdict": res.verdict})
    return out


def paired_comparisons(runs: pl.DataFrame, queries: Queries, *, baseline: str = "clip", baseline_rule: str = "last",
                       metrics: Sequence[str] = KEY_METRICS, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> pl.DataFrame:
    """One row per (comparison, method, cell, metric): mean paired difference over seeds (points of %),
    its 95 % bootstrap interval over evaluation queries and the verdict. `runs` needs the columns run,
    objective, head, layer_rule, n_pairs, seed; `queries` maps a run id to its per-query arrays (runs
    without them are left out)."""
    rows = _compare("objective", "objective", baseline, ("layer_rule", "n_pairs"), runs, queries, metrics,
                    resamples, seed)
    rows += _compare("layers", "layer_rule", baseline_rule, ("objective", "n_pairs"), runs, queries, metrics,
                     resamples, seed)
    schema = {"comparison": pl.String, "method": pl.String, "baseline": pl.String, "head": pl.String,
              "layer_rule": pl.String, "objective": pl.String, "n_pairs": pl.Int64, "metric": pl.String,
              "seeds": pl.Int64, "queries": pl.Int64, "query_unit": pl.String, "diff": pl.Float64,
              "low": pl.Float64, "high": pl.Float64, "verdict": pl.String}
    if not rows:
        return pl.DataFrame(schema=schema)
    return pl.DataFrame(rows, schema=schema, infer_schema_length=None)
