"""`stratalign eval`: evaluate a saved run again (on its own or another dataset's test split)."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_metrics, store_url

_HIDDEN = ("eval_file", "previous_eval", "dataset_changed")


def eval_cmd(
    run: str = typer.Option(..., help="Run id (or a unique prefix; see `stratalign runs ls`)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluate on another dataset's test split (same encoders)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Re-load a run's heads and evaluate retrieval and zero-shot classification (FAISS search).

    On another dataset the result is written to runs/<id>/eval-<dataset>.json with that dataset's fingerprint
    (the path is printed); a stored result of another version of the dataset is recomputed, never shown."""
    from stratalign.stages.runs.evaluate import evaluate_saved_run
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    fs = FeatureStore.open(store_url(store), "a")
    rid = RunRegistry(fs).resolve(run)
    res = evaluate_saved_run(fs, rid, dataset)
    version = str(res.get("eval_dataset_fingerprint", ""))[:16]
    console.print(f"run {rid} on {dataset or 'its own dataset'} (test split, dataset version {version})")
    if res.get("dataset_changed"):
        console.print(f"[yellow]note[/yellow]: {res['dataset_changed']}")
    if res.get("previous_eval") == "stale":
        console.print("[yellow]note[/yellow]: the stored result was computed on another version of the dataset "
                      "(or before results recorded it): recomputed")
    print_metrics({k: v for k, v in res.items() if k not in _HIDDEN})
    if res.get("eval_file"):
        console.print(f"written: {res['eval_file']}")
