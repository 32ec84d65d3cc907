"""`stratalign eval`: evaluate a saved run again (on its own or another dataset's test split)."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_metrics, store_url


def eval_cmd(
    run: str = typer.Option(..., help="Run id (or a unique prefix; see `stratalign runs ls`)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluate on another dataset's test split (same encoders)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Re-load a run's heads and evaluate retrieval and zero-shot classification (FAISS search)."""
    from stratalign.stages.evaluate import evaluate_saved_run
    from stratalign.store.features import FeatureStore
    from stratalign.store.runs import RunRegistry

    fs = FeatureStore.open(store_url(store), "a")
    rid = RunRegistry(fs).resolve(run)
    res = evaluate_saved_run(fs, rid, dataset)
    console.print(f"run {rid} on {dataset or 'its own dataset'} (test split)")
    print_metrics(res)
