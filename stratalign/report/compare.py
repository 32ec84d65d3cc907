"""Paired comparisons of sweep cells against named baselines, from the runs' per-query results.

A method is (objective, layer rule, head). Three kinds of comparison, each paired run by run (same n_pairs,
same seed, same test queries):
- objective: each objective against `baseline` (default CLIP) on the same layer rule (an objective with its own
  head, e.g. CSA, is compared with the baseline's linear head);
- vs_last: each method against the baseline on `baseline_rule` (default the last layers): what a user gains over
  the plain recipe, layer choice and objective together;
- layers: each layer rule against `baseline_rule` with the same objective;
- control: an objective against its registry `control` on the same layer rule (clip+structure+unpaired against
  clip+structure: the same cell with and without its unpaired rows, docs/method.md § 3.11).
Intervals and verdicts come from core.stats.two_level_bootstrap (seeds, then queries); nothing else decides
"helps" or "hurts". `cell_intervals` gives the same two-level interval of each cell's own mean, for plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from stratalign.core.metric_registry import VERDICT, query_units, shown_in
from stratalign.core.objectives import REGISTRY
from stratalign.core.stats import DEFAULT_RESAMPLES, PairedDifference, two_level_bootstrap
from stratalign.report.leaderboard import CELL_COLUMNS
from stratalign.report.naming import method_label

KEY_METRICS = shown_in(VERDICT)  # core.metric_registry
QUERY_UNIT = query_units()
CONTROLS = {o.name: o.control for o in REGISTRY if o.control}  # objective -> the objective it is also compared with
Queries = Mapping[str, Mapping[str, np.ndarray]]  # run id -> per-query arrays
SCHEMA = {"comparison": pl.String, "method": pl.String, "baseline": pl.String, "head": pl.String,
          "layer_rule": pl.String, "objective": pl.String, "baseline_rule": pl.String, "n_pairs": pl.Int64,
          "metric": pl.String, "seeds": pl.Int64, "queries": pl.Int64, "query_unit": pl.String, "diff": pl.Float64,
          "low": pl.Float64, "high": pl.Float64, "half_width": pl.Float64, "verdict": pl.String}


def _rows(runs: pl.DataFrame) -> list[dict[str, Any]]:
    return list(runs.iter_rows(named=True))


def _same_queries(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str) -> bool:
    rows = "caption_rows" if metric.startswith("t2i") else "image_rows"
    return metric in a and metric in b and np.array_equal(a[rows], b[rows])


def _baseline_runs(rows: list[dict[str, Any]], objective: str, rule: str) -> dict[tuple, str]:
    """(n_pairs, seed, head) -> run of the baseline method."""
    return {(r["n_pairs"], r["seed"], r["head"]): r["run"] for r in rows
            if r["objective"] == objective and r["layer_rule"] == rule}


def _pairs(rows: list[dict[str, Any]], kind: str, baseline: str, baseline_rule: str) -> dict[tuple, list]:
    """{(method label, objective, layer rule, head, n_pairs, baseline label, baseline rule): [(run, baseline run)]}."""
    out: dict[tuple, list[tuple[str, str]]] = {}
    for r in rows:
        if kind == "objective":  # on the baseline's own layer rule this is the vs_last comparison: not twice
            if r["objective"] == baseline or r["layer_rule"] == baseline_rule:
                continue
            base_obj, base_rule, label = baseline, r["layer_rule"], r["objective"]
        elif kind == "vs_last":
            if r["objective"] == baseline and r["layer_rule"] == baseline_rule:
                continue
            base_obj, base_rule, label = baseline, baseline_rule, method_label(r["objective"], r["layer_rule"])
        elif kind == "control":
            if r["objective"] not in CONTROLS:
                continue
            base_obj, base_rule, label = CONTROLS[r["objective"]], r["layer_rule"], r["objective"]
        else:  # layers
            if r["layer_rule"] == baseline_rule:
                continue
            base_obj, base_rule, label = r["objective"], baseline_rule, r["layer_rule"]
        base = _baseline_runs(rows, base_obj, base_rule)
        key = (r["n_pairs"], r["seed"])
        partner = base.get((*key, r["head"])) or base.get((*key, "linear"))
        if partner is not None:
            cell = (label, r["objective"], r["layer_rule"], r["head"], r["n_pairs"],
                    base_obj if kind != "layers" else base_rule, base_rule)
            out.setdefault(cell, []).append((r["run"], partner))
    return out


def _paired(pairs: list[tuple[str, str]], queries: Queries, metric: str, resamples: int,
            seed: int) -> PairedDifference | None:
    """The two-level difference (first - second run of each pair) on `metric` over the pairs scored on the same
    queries; None when no pair is."""
    usable = [(m, b) for m, b in pairs if _same_queries(queries[m], queries[b], metric)]
    if not usable:
        return None
    return two_level_bootstrap([queries[m][metric] for m, _ in usable], [queries[b][metric] for _, b in usable],
                               resamples=resamples, seed=seed)


def _compare(kind: str, rows: list[dict[str, Any]], queries: Queries, baseline: str, baseline_rule: str,
             metrics: Sequence[str], resamples: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for (label, objective, rule, head, n, base_label, base_rule), pairs in _pairs(rows, kind, baseline,
                                                                                    baseline_rule).items():
        pairs = [(m, b) for m, b in pairs if m in queries and b in queries]
        for metric in metrics:
            res = _paired(pairs, queries, metric, resamples, seed)
            if res is None:
                continue
            out.append({"comparison": kind, "method": label, "baseline": base_label, "head": head,
                        "layer_rule": rule, "objective": objective, "baseline_rule": base_rule, "n_pairs": n,
                        "metric": metric, "seeds": res.seeds, "queries": res.queries,
                        "query_unit": QUERY_UNIT.get(metric, "queries"), "diff": res.diff,
                        "low": res.low, "high": res.high, "half_width": res.half_width, "verdict": res.verdict})
    return out


def paired_comparisons(runs: pl.DataFrame, queries: Queries, *, baseline: str = "clip", baseline_rule: str = "last",
                       metrics: Sequence[str] = KEY_METRICS, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> pl.DataFrame:
    """One row per (comparison, method, cell, metric): the mean paired difference over seeds (points of %), its 95 %
    two-level bootstrap interval and half-width, and the verdict. `runs` needs the columns run, objective, head,
    layer_rule, n_pairs, seed; `queries` maps a run id to its per-query arrays (runs without them are left out)."""
    rows = _rows(runs)
    table = []
    for kind in ("objective", "vs_last", "layers", "control"):
        table += _compare(kind, rows, queries, baseline, baseline_rule, metrics, resamples, seed)
    if not table:
        return pl.DataFrame(schema=SCHEMA)
    return pl.DataFrame(table, schema=SCHEMA, infer_schema_length=None)


def cell_intervals(runs: pl.DataFrame, queries: Queries, *, metrics: Sequence[str] = KEY_METRICS,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> pl.DataFrame:
    """One row per (cell, metric): the mean over seeds of the test metric (in %) and its two-level 95 % interval,
    the same intervals the comparisons use (plots draw these as error bars)."""
    out = []
    cells: dict[tuple, list[str]] = {}
    for r in _rows(runs):
        if r["run"] in queries:
            cells.setdefault((r["objective"], r["layer_rule"], r["head"], r["n_pairs"]), []).append(r["run"])
    for (objective, rule, head, n), run_ids in cells.items():
        for metric in metrics:
            hits = [queries[rid][metric] for rid in run_ids if metric in queries[rid]]
            if len(hits) != len(run_ids) or len({len(h) for h in hits}) != 1:
                continue
            res = two_level_bootstrap(hits, resamples=resamples, seed=seed)
            out.append({"objective": objective, "layer_rule": rule, "head": head, "n_pairs": n, "metric": metric,
                        "mean": res.diff, "low": res.low, "high": res.high, "seeds": res.seeds})
    return pl.DataFrame(out, infer_schema_length=None)


def grid_differences(grid_b: pl.DataFrame, grid_a: pl.DataFrame, queries: Queries, *,
                     metrics: Sequence[str] = KEY_METRICS, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> pl.DataFrame:
    """The same grid run two ways (B against A: another precision, machine or library version): one row per
    (cell, metric) with B - A's mean over seeds, its two-level 95 % interval and verdict, paired run by run on
    (cell, seed). Both tables need the columns run, objective, layer_rule, head, n_pairs, seed; runs without a
    partner or per-query arrays are left out."""
    a_runs = {tuple(r[c] for c in (*CELL_COLUMNS, "seed")): r["run"] for r in _rows(grid_a)}
    cells: dict[tuple, list[tuple[str, str]]] = {}
    for r in _rows(grid_b):
        partner = a_runs.get(tuple(r[c] for c in (*CELL_COLUMNS, "seed")))
        if partner is not None and r["run"] in queries and partner in queries:
            cells.setdefault(tuple(r[c] for c in CELL_COLUMNS), []).append((r["run"], partner))
    out = []
    for cell, pairs in cells.items():
        for metric in metrics:
            res = _paired(pairs, queries, metric, resamples, seed)
            if res is None:
                continue
            out.append({**dict(zip(CELL_COLUMNS, cell)), "metric": metric, "seeds": res.seeds, "diff": res.diff,
                        "low": res.low, "high": res.high, "verdict": res.verdict})
    return pl.DataFrame(out, infer_schema_length=None)


def with_choice_ties(comparisons: pl.DataFrame, tuning: pl.DataFrame) -> pl.DataFrame:
    """`comparisons` with a `choice_tie` column: which side of each comparison is a cell whose knob choice was a
    near-tie on validation (tuning's chosen row with `clear_choice` false: stages.runs.choice_margin), "method",
    "baseline", "both", or null. Such a verdict stands on a choice validation could not make: the runner-up point,
    as good there, might give another. Measured on the demo (benchmarks/precision_answers.py): of the 36 verdicts
    bf16 changed, 31 had a near-tie on a side; of the 112 without one, 107 held."""
    ties: set[tuple] = set()
    cells: set[tuple] = set()
    if tuning.height and "clear_choice" in tuning.columns:
        for r in tuning.filter(pl.col("chosen")).iter_rows(named=True):
            key = (r["objective"], r["layer_rule"], r["head"], r["n_pairs"])
            cells.add(key)
            if r["clear_choice"] is False:
                ties.add(key)

    def side(r: dict[str, Any]) -> str | None:
        # the baseline cell as _pairs found it: its layer rule is `baseline_rule` for every kind; its objective is the
        # method's own in a layers comparison (whose `baseline` names the rule)
        base_obj = r["objective"] if r["comparison"] == "layers" else r["baseline"]
        base = (base_obj, r["baseline_rule"], r["head"], r["n_pairs"])
        if base not in cells:  # paired with the baseline's linear head (see _pairs)
            base = (base_obj, r["baseline_rule"], "linear", r["n_pairs"])
        method = (r["objective"], r["layer_rule"], r["head"], r["n_pairs"]) in ties
        return {(True, True): "both", (True, False): "method", (False, True): "baseline"}.get((method, base in ties))

    column = [side(r) for r in comparisons.iter_rows(named=True)] if comparisons.height else []
    return comparisons.with_columns(pl.Series("choice_tie", column, dtype=pl.String))
