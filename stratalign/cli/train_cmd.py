"""`stratalign train`: train alignment heads on cached features and save the run."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_metrics, store_url
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


def train_cmd(
    dataset: str = typer.Option(..., help="Dataset with extracted features."),
    vision: str = typer.Option(..., help="Vision encoder spec."),
    text: str = typer.Option(..., help="Text encoder spec."),
    layers: str = typer.Option("auto", help="auto (recorded by `layers --choose`), last, or V,T."),
    head: Optional[str] = typer.Option(None, help="linear | mlp | residual | csa | procrustes | asif (default: the "
                                                  "objective's own head, as `sweep` picks it; else linear)."),
    objective: str = typer.Option("clip", help="clip | clip+structure | clip+structure-knn | clip+ib | clip+vib | "
                                               "clip+fusemix | comm | csa | procrustes | asif."),
    n_pairs_: Optional[str] = typer.Option(None, "--n-pairs", callback=check_n_pairs,
                                           help="Training pairs drawn from the train split (default all)."),
    seed: int = typer.Option(0, help="Seed of the subset, the validation carve-out or folds and the initialisation."),
    ids: Optional[str] = typer.Option(None, help="File of caption ids (one per line) to train on instead."),
    ids_kind: str = typer.Option("caption", help="What --ids lists: caption or image ids."),
    preset: str = typer.Option("auto", callback=check_preset, help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help="Trainer override key=value (e.g. max_steps=500, lam=5)."),
    select: Optional[str] = typer.Option(None, callback=check_select, help=SELECT_HELP),
    tune: bool = typer.Option(False, "--tune", help=TUNE_HELP),
    validation: str = typer.Option("auto", callback=check_validation, help=VALIDATION_HELP),
    folds: int = typer.Option(5, callback=check_folds, help=FOLDS_HELP),
    force: bool = typer.Option(False, help="Train again even if the identical run is in the store."),
    store: Optional[str] = StoreOption,
) -> None:
    """Train alignment heads on cached features, evaluate on the test split, save the run."""
    from stratalign.core.objectives import objective_named
    from stratalign.stages.runs.config import ResolvedRun
    from stratalign.stages.runs.training import RunConfig, resolve_run, train_run
    from stratalign.stages.subsets import KFOLD, cell_validation, validation_source
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    head = head or objective_named(objective).own_head or "linear"
    fs = FeatureStore.open(store_url(store), "a")
    overrides = trainer_overrides(set_)
    cfg = RunConfig(dataset=dataset, vision=vision, text=text, layers=layers, head=head, objective=objective,
                    n_pairs=n_pairs(n_pairs_), seed=seed, ids_file=ids, ids_kind=ids_kind,
                    options=overrides, preset=preset, select=select, validation=validation, folds=folds)
    # one run picks its own checkpoint on the val split (or carved pairs); --tune chooses as a cell does, and a cell
    # of a dataset with no or a tiny val split, or --validation kfold, chooses over folds then refits
    source = (cell_validation if tune else validation_source)(fs.dataset(dataset), validation)
    kfold = source == KFOLD
    cfg = replace(cfg, validation="kfold") if kfold else cfg
    # a bad option is one error line before anything else is printed (k-fold: fold 0 stands for the cell's runs)
    resolved = resolve_run(fs, replace(cfg, fold=0) if kfold else cfg)
    if kfold and not tune:  # the step is chosen over the folds, then the refit trains on every pair
        from stratalign.stages.runs.cells import choose_cells
        from stratalign.stages.runs.tune import tuned_run

        tuned = tuned_run(fs, choose_cells(fs, [cfg], tune=False, force=force, progress=True)[0][0])
        res = tuned.metrics
        _print_tuning(tuned)
        verb = (f"chosen over {folds} folds: {tuned.chosen_label()}; refit on every training pair" if tuned.tuning
                else f"refit on every training pair after {folds} folds")
    elif tune:
        from stratalign.stages.runs.tune import tune_run

        tuned = tune_run(fs, cfg, force=force, progress=True)
        res = tuned.metrics
        _print_tuning(tuned)
        verb = f"chosen on validation: {tuned.chosen_label()}" if tuned.tuning else "nothing to tune"
    else:
        res = train_run(fs, cfg, resolved=resolved, force=force, progress=True)  # tqdm on stderr, as extract/sweep
        verb = "already in the store" if res.get("skipped") else f"trained in {res.get('train_seconds', 0):.2f}s"
    console.print(f"run {res['run_id']} ({verb})")
    console.print(ResolvedRun.from_config(RunRegistry(fs).config(res["run_id"])).validation_note())
    console.print(test_note(fs, dataset), highlight=False)
    print_metrics(res)


def test_note(fs, dataset: str) -> str:
    """Which pairs the printed metrics come from: the test split and its size."""
    ds = fs.dataset(dataset)
    return (f"test metrics: the dataset's test split ({len(ds.image_rows('test'))} images, "
            f"{len(ds.pairs('test')[1])} captions)")


def _print_tuning(tuned) -> None:
    """The grid's validation values (best step of each point), the chosen point marked, edges said."""
    if not tuned.tuning:
        return
    record = tuned.tuning
    metric = record["metric"]
    for point in record["grid"]:
        mark = "*" if point["knobs"] == record["chosen"] else " "
        knobs = ", ".join(f"{k}={v}" for k, v in point["knobs"].items()) or "(no knobs)"
        at = f" at step {point['best_step']}" if point.get("best_step") is not None else ""
        console.print(f"{mark} {knobs:<24} val {metric} {point['value']:.4g}{at}  {point['run_id']}", highlight=False)
    if record.get("on_edge"):
        console.print(f"  the choice sits on the edge of the grid of {', '.join(record['on_edge'])} (extended as far "
                      "as its bound): a wider grid might choose otherwise", highlight=False)
