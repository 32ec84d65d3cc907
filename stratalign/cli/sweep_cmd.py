"""`stratalign sweep`: every cell of a grid of runs, then the leaderboard and plots."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import FeaturePrecisionOption, StoreOption, console, print_table, store_url
from stratalign.cli.values import (
    FOLDS_HELP,
    PRESET_HELP,
    SELECT_HELP,
    TUNE_HELP,
    VALIDATION_HELP,
    check_folds,
    check_n_pairs,
    check_preset,
    check_select,
    check_validation,
    n_pairs,
    trainer_overrides,
)
from stratalign.errors import StratalignError


def _rule_objective(value: str) -> tuple[str, str]:
    rule, sep, objective = value.partition(":")
    if not sep or not rule or not objective:
        raise StratalignError(f"--skip takes RULE:OBJECTIVE (e.g. last:clip+structure-knn), not {value!r}")
    return rule, objective


def sweep_cmd(
    dataset: str = typer.Option(..., help="Dataset with extracted features."),
    vision: str = typer.Option(..., help="Vision encoder spec (extracted on the dataset)."),
    text: str = typer.Option(..., help="Text encoder spec (extracted on the dataset)."),
    n_pairs_: list[str] = typer.Option(["all"], "--n-pairs", callback=check_n_pairs,
                                       help="Repeat: subset sizes ('all' = whole train pool)."),
    seed: list[int] = typer.Option([0, 1, 2], "--seed", help="Repeat: seeds."),
    objective: list[str] = typer.Option(["clip", "clip+structure"], "--objective", help="Repeat: objectives."),
    layers: list[str] = typer.Option(["last", "auto"], "--layers", help="Repeat: last, auto, or V,T."),
    head: list[str] = typer.Option(["linear"], "--head", help="Repeat: heads."),
    skip: list[str] = typer.Option([], "--skip", help="Repeat: RULE:OBJECTIVE cells to leave out (last:comm)."),
    preset: str = typer.Option("auto", callback=check_preset, help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help="Trainer override key=value for every cell."),
    select: Optional[str] = typer.Option(None, callback=check_select, help=SELECT_HELP),
    tune: bool = typer.Option(False, "--tune", help=TUNE_HELP),
    validation: str = typer.Option("auto", callback=check_validation, help=VALIDATION_HELP),
    folds: int = typer.Option(5, callback=check_folds, help=FOLDS_HELP),
    baseline: str = typer.Option("clip", help="Objective every other one is compared with (paired, per cell and seed)."),
    out: str = typer.Option("stratalign-report", help="Folder for leaderboard.parquet/.csv and the plots."),
    feature_precision: Optional[str] = FeaturePrecisionOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Run every cell of the grid not yet in the store; write the leaderboard and plots."""
    from stratalign.report.report import bottom_line, results_table
    from stratalign.stages.runs.sweep import SweepConfig, run_sweep
    from stratalign.stages.runs.training import RunConfig
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "a")
    overrides = trainer_overrides(set_)
    base = RunConfig(dataset=dataset, vision=vision, text=text, options=overrides, preset=preset, select=select,
                     validation=validation, folds=folds, feature_precision=feature_precision)
    cfg = SweepConfig(base=base,
                      n_pairs=tuple(n_pairs(v) for v in n_pairs_), seeds=tuple(seed), objectives=tuple(objective),
                      layer_rules=tuple(layers), heads=tuple(head), skip=tuple(_rule_objective(v) for v in skip),
                      baseline=baseline, tune=tune)
    if not cfg.cells():
        raise StratalignError("the sweep has no cells: give at least one objective, head, n-pairs and seed")
    res = run_sweep(fs, cfg, out)
    console.print(f"{res.trained} run(s) trained, {res.skipped} already in the store")
    print_table(results_table(res.leaderboard, res.intervals),
                title="leaderboard (test split, mean over seeds [95 % two-level interval])")
    for line in bottom_line(res.comparisons, res.leaderboard, baseline=baseline):
        console.print(line.replace("**", ""), soft_wrap=True, highlight=False)
    console.print("report: " + res.files.get("report_md", "") + "; files: "
                  + ", ".join(v for k, v in res.files.items() if k not in ("plot_seconds", "report_md")))
