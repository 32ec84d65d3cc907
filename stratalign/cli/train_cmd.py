"""`stratalign train`: train alignment heads on cached features and save the run."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_metrics, store_url
from stratalign.cli.values import check_n_pairs, n_pairs, trainer_overrides


def train_cmd(
    dataset: str = typer.Option(..., help="Dataset with extracted features."),
    vision: str = typer.Option(..., help="Vision encoder spec."),
    text: str = typer.Option(..., help="Text encoder spec."),
    layers: str = typer.Option("auto", help="auto (recorded by `layers --choose`), last, or V,T."),
    head: str = typer.Option("linear", help="linear | mlp | residual | csa."),
    objective: str = typer.Option("clip", help="clip | clip+structure | clip+structure-knn | clip+ib | clip+vib | comm | csa."),
    n_pairs_: Optional[str] = typer.Option(None, "--n-pairs", callback=check_n_pairs,
                                           help="Training pairs drawn from the train split (default all)."),
    seed: int = typer.Option(0, help="Seed of the subset, the validation carve-out and the initialisation."),
    ids: Optional[str] = typer.Option(None, help="File of caption ids (one per line) to train on instead."),
    ids_kind: str = typer.Option("caption", help="What --ids lists: caption or image ids."),
    set_: list[str] = typer.Option([], "--set", help="Trainer override key=value (e.g. max_steps=500, lam=5)."),
    force: bool = typer.Option(False, help="Train again even if the identical run is in the store."),
    store: Optional[str] = StoreOption,
) -> None:
    """Train alignment heads on cached features, evaluate on the test split, save the run."""
    from stratalign.stages.train import RunConfig, train_run
    from stratalign.store.features import FeatureStore

    fs = FeatureStore.open(store_url(store), "a")
    cfg = RunConfig(dataset=dataset, vision=vision, text=text, layers=layers, head=head, objective=objective,
                    n_pairs=n_pairs(n_pairs_), seed=seed, ids_file=ids, ids_kind=ids_kind,
                    options=trainer_overrides(set_))
    res = train_run(fs, cfg, force=force, progress=True)
    verb = "already in the store" if res.get("skipped") else f"trained in {res.get('train_seconds', 0):.2f}s"
    console.print(f"run {res['run_id']} ({verb})")
    print_metrics(res)
