"""Sweeps over n-pairs x seeds x objectives x layer rule x heads, each cell a run in the store.

A cell's run id is the hash of its resolved config, so a cell already run is skipped; the other cells
train batched (stages.train.train_runs), with the same numbers as one train_run per cell. The leaderboard
(Parquet + CSV) holds every metric as mean and std over seeds; plots show R@1 both ways and zero-shot
accuracy against n-pairs per objective.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import polars as pl
from tqdm.auto import tqdm

from stratalign.core.layer_rule import LayerRule
from stratalign.core.objectives import check_head_kind, objective_named
from stratalign.errors import StratalignError
from stratalign.report.leaderboard import CELL_COLUMNS, aggregate
from stratalign.stages.run_config import RunConfig, resolve_run
from stratalign.stages.train import train_runs
from stratalign.store.features import FeatureStore
from stratalign.store.runs import RunRegistry

HEADLINE = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10", "t2i_R@10", "zs_top1", "zs_top5",
            "zs_balanced_acc", "alignment_mknn", "probe_acc", "best_step", "lambda_at_best", "train_seconds")


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
            if (rule, obj) in self.skip:
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


def run_table(registry: RunRegistry, run_ids: list[str]) -> pl.DataFrame:
    """One row per run: the cell description, seed and headline metrics."""
    rows = []
    for rid in run_ids:
        cfg, met = registry.config(rid), registry.metrics(rid)
        row: dict[str, Any] = {"run": rid, "objective": cfg["objective"], "head": cfg["head"],
                               "layer_rule": cfg["layer_rule"], "n_pairs": cfg["n_pairs"], "seed": cfg["seed"],
                               "vision_layer": cfg["vision_layer"], "text_layer": cfg["text_layer"]}
        for m in HEADLINE:
            v = met.get(m)
            row[m] = float(v) if isinstance(v, (int, float)) else None
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def run_sweep(store: FeatureStore, cfg: SweepConfig, out_dir: str | None = None, *, progress: bool = True,
              on_cell: Callable[[RunConfig, str, bool], None] | None = None) -> SweepResult:
    """Train and evaluate every cell not yet in the store; write the leaderboard and plots to out_dir.

    All cells are resolved first and done ones skipped; the rest train together (`train_runs`: features
    gathered once per entry and layer, runs that can share a loop batched, closed-form fits one by one)."""
    registry = RunRegistry(store)
    cells = cfg.cells()
    if not cells:
        raise StratalignError("the sweep has no cells: give at least one objective, head, n-pairs and seed")
    resolved = [resolve_run(store, cell) for cell in cells]  # every cell resolved first: bad ones fail early
    run_ids = [r.run_id for r in resolved]
    done = [registry.is_done(rid) for rid in run_ids]
    todo = list(dict((r.run_id, r) for r, d in zip(resolved, done) if not d).values())
    skipped = len(cells) - len(todo)
    bar = tqdm(total=len(cells), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    bar.update(skipped)
    bar.set_postfix(trained=0, skipped=skipped)
    by_id = {r.run_id: (cell, d) for cell, r, d in zip(cells, resolved, done)}
    if on_cell:
        for cell, r, d in zip(cells, resolved, done):
            if d:
                on_cell(cell, r.run_id, True)
    trained = 0

    def saved(metrics: dict[str, Any]) -> None:
        nonlocal trained
        trained += 1
        bar.update(1)
        bar.set_postfix(trained=trained, skipped=skipped)
        if on_cell:
            on_cell(by_id[metrics["run_id"]][0], metrics["run_id"], False)

    try:
        if todo:
            train_runs(store, todo, progress=progress, on_done=saved)
    finally:
        bar.close()
    runs = run_table(registry, run_ids)
    metrics = [m for m in HEADLINE if m in runs.columns and runs[m].null_count() < runs.height]
    board = aggregate(runs.drop("run", "vision_layer", "text_layer"), by=CELL_COLUMNS, metrics=metrics)
    layers = runs.group_by("layer_rule").agg(pl.col("vision_layer").first(), pl.col("text_layer").first())
    board = board.join(layers, on="layer_rule", how="left")
    result = SweepResult(run_ids, trained, skipped, runs, board)
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
    }
    result.leaderboard.write_parquet(files["leaderboard_parquet"])
    result.leaderboard.write_csv(files["leaderboard_csv"])
    result.runs.write_csv(files["runs_csv"])
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
    files["plot_seconds"] = f"{time.perf_counter() - t0:.2f}"
    return files
