"""`stratalign eval`: evaluate a saved run again (on its own or another dataset's test split)."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_metrics, store_url

_HIDDEN = ("eval_file", "previous_eval", "dataset_changed", "overlap", "unseen")


def _print_overlap(res: dict) -> None:
    """Warn about test pairs the run trained on, then print the metrics on the pairs it never saw."""
    o = res["overlap"]
    if not (o["images_trained_on"] or o["captions_trained_on"]):
        console.print(f"overlap with the run's training pairs: none ({o['test_images']} test images by content "
                      f"hash, {o['test_captions']} test captions by exact text)")
        return
    console.print(f"[yellow]warning[/yellow]: the test split shares {o['images_trained_on']} of its "
                  f"{o['test_images']} images (same bytes) and {o['captions_trained_on']} of its "
                  f"{o['test_captions']} captions (same text) with the run's training pairs: the metrics above "
                  "score pairs the heads trained on")
    if res.get("unseen") is None:
        console.print("  on the pairs the run never trained on: none are left")
        return
    console.print(f"  on the {o['unseen_images']} images / {o['unseen_captions']} captions the run never "
                  "trained on:")
    print_metrics(res["unseen"])


def eval_cmd(
    run: str = typer.Option(..., help="Run id (or a unique prefix; see `stratalign runs ls`)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluate on another dataset's test split (same encoders)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Re-load a run's heads and evaluate retrieval and zero-shot classification (FAISS search).

    On another dataset the result is written to runs/<id>/eval-<dataset>.json with that dataset's fingerprint
    (the path is printed); a stored result of another version of the dataset is recomputed, never shown. It
    also measures which test images (content hash) and captions (exact text) the run trained on, warns, and
    prints the metrics on the pairs it never trained on beside those on the whole split (both are stored)."""
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
    if "overlap" in res:
        _print_overlap(res)
    if res.get("eval_file"):
        console.print(f"written: {res['eval_file']}")
