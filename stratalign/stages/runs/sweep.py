"""Sweeps over n-pairs x seeds x objectives x layer rule x heads.

A cell (objective, layer rule, head, n-pairs) is chosen once for all its seeds (stages.runs.cells: the stopping
step, and with `tune` the objective's knobs, from validation averaged over the seeds), the same way for every
objective, so the cells compare under one rule. Runs are content-addressed, so a run already in the store is
skipped. The leaderboard (Parquet + CSV) holds every metric as mean and std over seeds; comparisons.csv the paired
differences against the baseline with their two-level intervals (stages.runs.comparisons); plots show R@k and
zero-shot accuracy against n-pairs per method.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import polars as pl

from stratalign.core.layer_rule import LayerRule
from stratalign.core.metric_registry import SWEEP, shown_in
from stratalign.core.objectives import check_head_kind, objective_named
from stratalign.errors import StratalignError
from stratalign.report.compare import with_choice_ties
from stratalign.report.leaderboard import CELL_COLUMNS, aggregate
from stratalign.report.naming import method_label
from stratalign.stages.runs.cells import CellChoice, choice_label, choose_cells
from stratalign.stages.runs.choice_margin import choice_margin
from stratalign.stages.runs.comparisons import compare_runs
from stratalign.stages.runs.config import RunConfig
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
    tune: bool = False  # each cell also chooses its objective's knobs from their grid (stages.runs.cells)

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
    tuning: pl.DataFrame = field(default_factory=pl.DataFrame)  # every cell's points: mean validation value, chosen
    choices: list[CellChoice] = field(default_factory=list)  # the cells' choices with their validation evidence
    intervals: pl.DataFrame = field(default_factory=pl.DataFrame)  # each cell's mean test metric, two-level interval
    majority: float | None = None  # the majority-class rate of the test split, in %
    val_curves: pl.DataFrame = field(default_factory=pl.DataFrame)  # every run's validation curve, one row a step
    costs: pl.DataFrame = field(default_factory=pl.DataFrame)  # seconds per cell: a final run, the whole choice


def curve_table(registry: RunRegistry, runs: pl.DataFrame, held_out: dict[str, list[str]] | None = None) -> pl.DataFrame:
    """The validation curves of the runs (rsum, zero-shot top-1, CLIP loss, lambda per evaluation step), one
    row per (run, step) with the cell columns; runs recorded before curves held every yardstick are left out.
    held_out: a k-fold refit's fold runs (its own curve is measured on pairs it trained on): its rows are their
    mean at the steps all of them evaluated."""
    rows = []
    for r in runs.select("run", "objective", "layer_rule", "n_pairs", "seed").to_dicts():
        for point in _curve(registry, (held_out or {}).get(r["run"]) or [r["run"]]):
            rows.append({**r, "method": method_label(r["objective"], r["layer_rule"]), **point})
    return pl.DataFrame(rows, infer_schema_length=None)


def _curve(registry: RunRegistry, run_ids: list[str]) -> list[dict[str, Any]]:
    """The validation curve of one run, or the mean curve of several at the steps every one evaluated."""
    curves = [{p["step"]: p for p in registry.metrics(rid).get("val_curve") or [] if isinstance(p, dict)}
              for rid in run_ids]
    if len(curves) == 1:
        return list(curves[0].values())
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    keys = [k for k in curves[0][steps[0]] if k != "step"] if steps else []
    return [{"step": s, **{k: float(np.mean([c[s][k] for c in curves])) for k in keys
                           if all(isinstance(c[s].get(k), (int, float)) for c in curves)}} for s in steps]


def held_out_runs(choices: list[CellChoice]) -> dict[str, list[str]]:
    """Per k-fold refit (a final run of a k-fold cell), its seed's fold runs at the chosen point."""
    out = {}
    for c in choices:
        if not c.folds:
            continue
        point = next(p for p in c.points if p.knobs == c.knobs)
        for j, rid in enumerate(c.final):  # selection runs are seed-major: a seed's k fold runs in a row
            out[rid] = list(point.runs[j * c.folds:(j + 1) * c.folds])
    return out


def run_seconds(metrics: dict[str, Any]) -> float | None:
    """What a run cost on the machine that trained it: its share of its stack's wall time when it was trained in a
    stack (train_share_seconds), else its own training or fit time."""
    v = metrics.get("train_share_seconds", metrics.get("train_seconds"))
    return float(v) if isinstance(v, (int, float)) else None


def cost_table(registry: RunRegistry, choices: list[CellChoice]) -> pl.DataFrame:
    """One row per cell: the mean seconds of its final runs, and the seconds of every run its choice trained (each
    grid point x seed, then the final runs) - the bake-off's cost per method (report.bakeoff)."""
    rows = []
    for c in choices:
        every = list(dict.fromkeys([rid for p in c.points for rid in p.runs] + list(c.final)))
        metrics = {rid: registry.metrics(rid) for rid in every}  # each run's metrics.json read once
        seconds = {rid: run_seconds(m) for rid, m in metrics.items()}
        final = [seconds[rid] for rid in c.final if seconds[rid] is not None]
        derived = {rid for rid in c.final if metrics[rid].get("derived_from")}  # paid by a selection run
        rows.append({"objective": c.cell.objective, "layer_rule": c.cell.layers, "head": c.cell.head,
                     "n_pairs": c.cell.n_pairs, "runs": len(every),
                     "run_seconds": sum(final) / len(final) if final else None,
                     "cell_seconds": sum(v for rid, v in seconds.items() if v is not None and rid not in derived)})
    return pl.DataFrame(rows, infer_schema_length=None)


def tuning_table(choices: list[CellChoice]) -> pl.DataFrame:
    """One row per grid point of every cell: the cell, the knob values, k of its k-fold validation (0: none), the
    mean validation value over the cell's seeds (and folds) at the point's best step, that step, whether the cell
    chose it, whether the choice sat on an edge, and on the chosen row its margin over the runner-up point with the
    seed-resampled 95 % interval (stages.runs.choice_margin; `clear_choice` false: a near-tie)."""
    rows = []
    for c in choices:
        margin = choice_margin(c)
        for point in c.points:
            mine = margin is not None and point.knobs == c.knobs
            rows.append({"objective": c.cell.objective, "layer_rule": c.cell.layers, "head": c.cell.head,
                         "n_pairs": c.cell.n_pairs, "seeds": len(c.seeds),
                         "knobs": ", ".join(f"{k}={v}" for k, v in point.knobs.items()),
                         "folds": c.folds, "metric": f"val_{c.metric}", "value": point.best_value,
                         "step": point.best_step,
                         "chosen": point.knobs == c.knobs, "on_edge": ", ".join(c.on_edge),
                         "runner_up": choice_label(margin.runner_up, None) if mine else None,
                         "margin": margin.margin if mine else None, "margin_low": margin.low if mine else None,
                         "margin_high": margin.high if mine else None, "clear_choice": margin.clear if mine else None,
                         "runs": " ".join(point.runs)})
    return pl.DataFrame(rows, infer_schema_length=None)


def run_table(registry: RunRegistry, run_ids: list[str], tuned: dict[str, str] | None = None,
              requested: dict[str, int | None] | None = None) -> pl.DataFrame:
    """One row per run: the cell description, seed, the knob values tuning chose (`tuned`, when tuned) and
    headline metrics."""
    rows = []
    for rid in run_ids:
        cfg, met = registry.config(rid), registry.metrics(rid)
        row: dict[str, Any] = {"run": rid, "objective": cfg["objective"], "head": cfg["head"],
                               "layer_rule": cfg["layer_rule"], "seed": cfg["seed"],
                               # the size asked for: None ("all") for every training pair, as the cell names it
                               "n_pairs": (requested or {}).get(rid, cfg["n_pairs"]),
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
    choices, run_ids = choose_cells(store, cells, tune=cfg.tune, progress=progress)
    trained = sum(c.trained for c in choices)
    skipped = sum(c.tried for c in choices) - trained
    labels = {rid: c.label() for c in choices for rid in c.final}
    if on_cell:
        done = {rid: c.trained == 0 for c in choices for rid in c.final}
        for cell, rid in zip(cells, run_ids):
            on_cell(cell, rid, done[rid])
    runs = run_table(registry, run_ids, labels, {rid: cell.n_pairs for cell, rid in zip(cells, run_ids)})
    metrics = [m for m in HEADLINE if m in runs.columns and runs[m].null_count() < runs.height]
    board = aggregate(runs.drop("run", "vision_layer", "text_layer", "tuned"),
                      by=CELL_COLUMNS, metrics=metrics)
    layers = runs.group_by("layer_rule").agg(pl.col("vision_layer").first(), pl.col("text_layer").first())
    board = board.join(layers, on="layer_rule", how="left")
    comparisons, intervals, majority = compare_runs(store, runs, baseline=cfg.baseline)
    if majority is not None:
        board = board.with_columns(pl.lit(majority).alias("zs_majority"))
    tuning = tuning_table(choices)
    result = SweepResult(run_ids, trained, skipped, runs, board, comparisons=with_choice_ties(comparisons, tuning),
                         tuning=tuning, val_curves=curve_table(registry, runs, held_out_runs(choices)),
                         choices=choices, intervals=intervals, majority=majority, costs=cost_table(registry, choices))
    if out_dir:
        result.files = write_leaderboard(result, out_dir)
    return result


def write_leaderboard(result: SweepResult, out_dir: str, *, title: str = "stratalign sweep",
                      extra: list[str] | None = None, layer_info: dict[str, Any] | None = None) -> dict[str, str]:
    """leaderboard.parquet/.csv, runs.csv, comparisons.csv, intervals.csv, tuning.csv, costs.csv, the plots, the
    bake-off page (report.bakeoff) and report.md (the same report `demo` writes: report.report.write_report)."""
    from stratalign.report.bakeoff import write_bakeoff
    from stratalign.report.report import write_report

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
    if result.intervals.height:
        files["intervals_csv"] = os.path.join(out_dir, "intervals.csv")
        result.intervals.write_csv(files["intervals_csv"])
    result.leaderboard.write_parquet(files["leaderboard_parquet"])
    result.leaderboard.write_csv(files["leaderboard_csv"])
    result.runs.write_csv(files["runs_csv"])
    result.comparisons.write_csv(files["comparisons_csv"])
    t0 = time.perf_counter()
    files.update(_interval_plots(result, out_dir))
    curves_png = _validation_curves(result.val_curves, out_dir)
    if curves_png:
        files["val_curves_png"] = curves_png
    files["plot_seconds"] = f"{time.perf_counter() - t0:.2f}"
    files.update(write_bakeoff(out_dir, result.intervals, result.comparisons, result.costs, title=f"{title}: bake-off"))
    if result.costs.height:
        files["costs_csv"] = os.path.join(out_dir, "costs.csv")
        result.costs.write_csv(files["costs_csv"])
    files["report_md"] = write_report(out_dir, title=title, board=result.leaderboard, layer_info=layer_info,
                                      files=files, extra=extra, comparisons=result.comparisons, tuning=result.tuning,
                                      intervals=result.intervals)
    return files


def _interval_plots(result: SweepResult, out_dir: str) -> dict[str, str]:
    """Retrieval and zero-shot against the subset size (each cell's mean with its two-level interval, chance and
    the majority class marked), and each method's paired difference against the baseline on the last layers."""
    from stratalign.report.plots import intervals_vs_pairs

    files: dict[str, str] = {}
    if result.intervals.height:
        rows = [{**r, "method": method_label(r["objective"], r["layer_rule"]), "value": r["mean"]}
                for r in result.intervals.iter_rows(named=True)]
        gallery = _queries(result.comparisons, "i2t_R@1")
        chance = {f"{d}_R@{k}": [(100.0 * k / gallery, "chance")] for d in ("i2t", "t2i") for k in (1, 5, 10)} \
            if gallery else {}
        recall = [m for m in ("i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10") if any(r["metric"] == m for r in rows)]
        if recall:
            files["recall_png"] = intervals_vs_pairs(rows, os.path.join(out_dir, "recall_vs_pairs.png"), recall,
                                                     hlines=chance, title="Retrieval on the test split (mean over "
                                                     "seeds, 95 % two-level interval)")
        if any(r["metric"] == "zs_top1" for r in rows):
            lines = [(result.majority, "majority class")] if result.majority is not None else []
            files["zeroshot_png"] = intervals_vs_pairs(rows, os.path.join(out_dir, "zeroshot_vs_pairs.png"),
                                                       ["zs_top1"], hlines={"zs_top1": lines},
                                                       title="Zero-shot top-1 (test split)")
    vs = result.comparisons.filter(pl.col("comparison") == "vs_last") if result.comparisons.height else None
    if vs is not None and vs.height:
        rows = [{**r, "value": r["diff"]} for r in vs.iter_rows(named=True)]
        metrics = [m for m in ("i2t_R@1", "t2i_R@1", "zs_top1") if any(r["metric"] == m for r in rows)]
        base = vs["baseline"][0]
        files["differences_png"] = intervals_vs_pairs(
            rows, os.path.join(out_dir, "differences_vs_last.png"), metrics, zero_line=True,
            ylabel="difference (points of %)", title=f"Paired difference against {base} on the last layers (95 % "
            "two-level interval)")
    return files


def _queries(comparisons: pl.DataFrame, metric: str) -> int | None:
    rows = comparisons.filter(pl.col("metric") == metric) if comparisons.height else comparisons
    return int(rows["queries"][0]) if rows.height else None


def _validation_curves(table: pl.DataFrame, out_dir: str) -> str | None:
    """Validation rsum and zero-shot along training per objective / layers (mean +- std over seeds) at the
    largest training set: the retrieval / zero-shot trade-off one stopping point would hide (docs/method.md § 3.8)."""
    from stratalign.report.plots import curves

    if not table.height or "rsum" not in table.columns:
        return None
    top = (table.filter(pl.col("n_pairs").is_null()) if table["n_pairs"].null_count()
           else table.filter(pl.col("n_pairs") == table["n_pairs"].max()))
    ys = ["rsum"] + (["zs_top1"] if "zs_top1" in top.columns and top["zs_top1"].null_count() < top.height else [])
    path = os.path.join(out_dir, "validation_curves.png")
    label = "all" if top["n_pairs"][0] is None else int(top["n_pairs"][0])
    return curves(top, path, x="step", y=ys, hue="method", logx=False, xlabel="optimiser step",
                  title=f"Validation along training ({label} pairs; mean ± sd over seeds)")
