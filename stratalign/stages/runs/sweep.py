"""Sweeps over n-pairs x seeds x objectives x layer rule x heads, each cell a run in the store.

A cell's run id is the hash of its resolved config, so a cell already run is skipped. The leaderboard
(Parquet + CSV) holds every metric as mean and std over seeds; comparisons.csv the paired differences
against the baseline with their bootstrap intervals (stages.runs.comparisons); plots show R@1 both ways and zero-shot
accuracy against n-pairs per objective.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import polars as pl

from stratalign.core.layer_rule import LayerRule
from stratalign.core.metric_registry import SWEEP, shown_in
from stratalign.core.objectives import check_head_kind, objective_named
from stratalign.errors import StratalignError
from stratalign.report.leaderboard import CELL_COLUMNS, aggregate
from stratalign.stages.runs.comparisons import compare_runs
from stratalign.stages.runs.config import RunConfig, resolve_run
from stratalign.stages.runs.training import train_runs
from stratalign.stages.runs.tune import TunedRun, tune_runs
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

HEADLINE = shown_in(SWEEP)  # the registry's metrics of a sweep's runs table (core.metric_registry)


@dataclass(frozen=True)
class SweepConfig:
    """The grid; every other setting comes from `base` (a RunConfig)."""

    base: RunConfig
    n_pairs: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0, 1, 2)
    objectives: tuple[str, ...] = ("clip", "clip+structure")
    layer_rules: tuple[str, ...] = ("last", "auto")
    heads: tuple[str, ...] = ("linear",)
    skip: tuple[tuple[str, str], ...] = ()  # (layer rule, objective) pairs left out of the grid
    skip_n: tuple[tuple[str, int | None], ...] = ()  # (objective, n_pairs) pairs left out (every layer rule)
    baseline: str = "clip"  # the objective every other one is compared with, cell by cell and seed by seed
    tune: bool = False  # each cell: the best point of its objective's grid on validation (stages.runs.tune)

    def cells(self) -> list[RunConfig]:
        """Every cell of the grid, once; an objective with its own head (csa) gets it, others skip it."""
        for rule in self.layer_rules:
            LayerRule.parse(rule)  # a bad rule or head fails here, before any cell trains
        for head in self.heads:
            check_head_kind(head)
        for rule, obj in self.skip:
            if rule not in self.layer_rules or obj not in self.objectives:
                raise StratalignError(f"--skip {rule}:{obj} matches no cell: layer rules {list(self.layer_rules)}, "
                                      f"objectives {list(self.objectives)}")
        out = []
        for rule, obj, head, n, seed in itertools.product(self.layer_rules, self.objectives, self.heads,
                                                          self.n_pairs, self.seeds):
            if (rule, obj) in self.skip or (obj, n) in self.skip_n:
                continue
            objective = objective_named(obj)
            if objective.own_head:
                head = objective.own_head  # e.g. CSA: a closed-form head with its own objective
            elif head not in objective.heads:
                continue
            out.append(replace(self.base, layers=rule, objective=obj, head=head, n_pairs=n, seed=seed))
        return list(dict.fromkeys(out))


@dataclass
class SweepResult:
    run_ids: list[str]
    trained: int
    skipped: int
    runs: pl.DataFrame
    leaderboard: pl.DataFrame
    files: dict[str, str] = field(default_factory=dict)
    comparisons: pl.DataFrame = field(default_factory=pl.DataFrame)  # paired differences (report.compare)
    tuning: pl.DataFrame = field(default_factory=pl.DataFrame)  # every grid point's validation value (tuned sweeps)
    val_curves: pl.DataFrame = field(default_factory=pl.DataFrame)  # every run's validation curve, one row a step


def curve_table(registry: RunRegistry, runs: pl.DataFrame) -> pl.DataFrame:
    """The validation curves of the runs (rsum, zero-shot top-1, CLIP loss, lambda per evaluation step), one
    row per (run, step) with the cell columns; runs recorded before curves held every yardstick are left out."""
    rows = []
    for r in runs.select("run", "objective", "layer_rule", "n_pairs", "seed").to_dicts():
        for point in registry.metrics(r["run"]).get("val_curve") or []:
            if isinstance(point, dict):
                rows.append({**r, "method": f"{r['objective']} / {r['layer_rule']}", **point})
    return pl.DataFrame(rows, infer_schema_length=None)


def tuning_table(tunings: list[tuple[RunConfig, TunedRun]]) -> pl.DataFrame:
    """One row per grid point tried: the cell, the knob values, the run, its validation value, whether chosen."""
    rows = []
    for cell, tuned in tunings:
        if not tuned.tuning:
            continue
        for point in tuned.tuning["grid"]:
            rows.append({"objective": cell.objective, "layer_rule": cell.layers, "n_pairs": cell.n_pairs,
                         "seed": cell.seed, "knobs": ", ".join(f"{k}={v}" for k, v in point["knobs"].items()),
                         "metric": f"val_{tuned.tuning['metric']}", "value": point["value"], "run": point["run_id"],
                         "chosen": point["run_id"] == tuned.run_id})
    return pl.DataFrame(rows, infer_schema_length=None)


def run_table(registry: RunRegistry, run_ids: list[str], tuned: dict[str, str] | None = None) -> pl.DataFrame:
    """One row per run: the cell description, seed, the knob values tuning chose (`tuned`, when tuned) and
    headline metrics."""
    rows = []
    for rid in run_ids:
        cfg, met = registry.config(rid), registry.metrics(rid)
        row: dict[str, Any] = {"run": rid, "objective": cfg["objective"], "head": cfg["head"],
                               "layer_rule": cfg["layer_rule"], "n_pairs": cfg["n_pairs"], "seed": cfg["seed"],
                               "vision_layer": cfg["vision_layer"], "text_layer": cfg["text_layer"]}
        if tuned is not None:
            row["tuned"] = tuned.get(rid, "")
        concat = (met.get("probe_baselines") or {}).get("concat") or {}
        met = {**met, "probe_concat_acc": concat.get("acc")}  # CoMM: a probe on the frozen features, side by side
        for m in HEADLINE:
            v = met.get(m)
            row[m] = float(v) if isinstance(v, (int, float)) else None
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def run_sweep(store: FeatureStore, cfg: SweepConfig, out_dir: str | None = None, *, progress: bool = True,
              on_cell: Callable[[RunConfig, str, bool], None] | None = None) -> SweepResult:
    """Train and evaluate every cell not yet in the store; write the leaderboard and plots to out_dir."""
    registry = RunRegistry(store)
    cells = cfg.cells()
    if not cells:
        raise StratalignError("the sweep has no cells: give at least one objective, head, n-pairs and seed")
    early: dict[RunConfig, Any] = {}
    for cell in cells:  # one cell of each objective x layer rule x head resolved first: a bad setting fails now
        kind = (cell.objective, cell.layers, cell.head)
        if kind not in {(c.objective, c.layers, c.head) for c in early}:
            early[cell] = resolve_run(store, cell)
    run_ids, trained, skipped = [], 0, 0
    tunings: list[tuple[RunConfig, TunedRun]] = []
    if cfg.tune:  # every grid point of every cell trains in one batched call
        for cell, tuned in zip(cells, tune_runs(store, cells, progress=progress)):
            tunings.append((cell, tuned))
            run_ids.append(tuned.run_id)
            trained, skipped = trained + tuned.trained, skipped + tuned.tried - tuned.trained
            if on_cell:
                on_cell(cell, tuned.run_id, tuned.trained == 0)
    else:
        resolved = [early.get(cell) or resolve_run(store, cell) for cell in cells]
        for cell, res in zip(cells, train_runs(store, cells, resolved=resolved, progress=progress)):
            run_ids.append(res["run_id"])
            trained, skipped = trained + (not res["skipped"]), skipped + bool(res["skipped"])
            if on_cell:
                on_cell(cell, res["run_id"], bool(res["skipped"]))
    runs = run_table(registry, run_ids, {t.run_id: t.chosen_label() for _, t in tunings} if cfg.tune else None)
    metrics = [m for m in HEADLINE if m in runs.columns and runs[m].null_count() < runs.height]
    board = aggregate(runs.drop("run", "vision_layer", "text_layer", *(["tuned"] if cfg.tune else [])),
                      by=CELL_COLUMNS, metrics=metrics)
    layers = runs.group_by("layer_rule").agg(pl.col("vision_layer").first(), pl.col("text_layer").first())
    board = board.join(layers, on="layer_rule", how="left")
    comparisons, majority = compare_runs(store, runs, baseline=cfg.baseline)
    if majority is not None:
        board = board.with_columns(pl.lit(majority).alias("zs_majority"))
    result = SweepResult(run_ids, trained, skipped, runs, board, comparisons=comparisons,
                         tuning=tuning_table(tunings), val_curves=curve_table(registry, runs))
    if out_dir:
        result.files = write_leaderboard(result, out_dir)
    return result


def write_leaderboard(result: SweepResult, out_dir: str) -> dict[str, str]:
    """leaderboard.parquet/.csv, runs.csv and the two plots."""
    from stratalign.report.plots import curves

    os.makedirs(out_dir, exist_ok=True)
    files = {
        "leaderboard_parquet": os.path.join(out_dir, "leaderboard.parquet"),
        "leaderboard_csv": os.path.join(out_dir, "leaderboard.csv"),
        "runs_csv": os.path.join(out_dir, "runs.csv"),
        "comparisons_csv": os.path.join(out_dir, "comparisons.csv"),
    }
    if result.tuning.height:
        files["tuning_csv"] = os.path.join(out_dir, "tuning.csv")
        result.tuning.write_csv(files["tuning_csv"])
    result.leaderboard.write_parquet(files["leaderboard_parquet"])
    result.leaderboard.write_csv(files["leaderboard_csv"])
    result.runs.write_csv(files["runs_csv"])
    result.comparisons.write_csv(files["comparisons_csv"])
    runs = result.runs.with_columns(
        pl.concat_str([pl.col("objective"), pl.lit(" / "), pl.col("layer_rule")]).alias("method"))
    t0 = time.perf_counter()
    recall_png = os.path.join(out_dir, "recall_vs_pairs.png")
    curves(runs, recall_png, x="n_pairs", y=["i2t_R@1", "t2i_R@1"], hue="method",
           title="Retrieval R@1 (test split) vs training pairs")
    files["recall_png"] = recall_png
    if "zs_top1" in runs.columns and runs["zs_top1"].null_count() < runs.height:
        zs_png = os.path.join(out_dir, "zeroshot_vs_pairs.png")
        curves(runs, zs_png, x="n_pairs", y=["zs_top1"], hue="method",
               title="Zero-shot top-1 accuracy vs training pairs")
        files["zeroshot_png"] = zs_png
    curves_png = _validation_curves(result.val_curves, out_dir)
    if curves_png:
        files["val_curves_png"] = curves_png
    files["plot_seconds"] = f"{time.perf_counter() - t0:.2f}"
    return files


def _validation_curves(table: pl.DataFrame, out_dir: str) -> str | None:
    """Validation rsum and zero-shot along training per objective / layers (mean +- std over seeds) at the
    largest training set: the retrieval / zero-shot trade-off one stopping point would hide (METHOD 3.6)."""
    from stratalign.report.plots import curves

    if not table.height or "rsum" not in table.columns:
        return None
    top = table.filter(pl.col("n_pairs") == table["n_pairs"].max())
    ys = ["rsum"] + (["zs_top1"] if "zs_top1" in top.columns and top["zs_top1"].null_count() < top.height else [])
    path = os.path.join(out_dir, "validation_curves.png")
    return curves(top, path, x="step", y=ys, hue="method", logx=False, xlabel="optimiser step",
                  title=f"Validation along training ({int(top['n_pairs'][0])} pairs; mean ± std over seeds)")
