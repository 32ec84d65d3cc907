"""A small store with a dataset, its features and trained runs, shared by the model, CLI and serve tests."""

from __future__ import annotations

from pathlib import Path

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.runs.training import RunConfig, train_run
from stratalign.store.feature_store import FeatureStore

FAST = (("max_steps", 30), ("patience", 10), ("eval_every", 5), ("warmup_steps", 5), ("dim", 16),
        ("comm_dim", 32), ("comm_heads", 2), ("comm_out", 16))

def _store(root: Path, encoders: tuple[str, str], limit: int) -> FeatureStore:
    store = FeatureStore.open(str(root / "store"), "a", create=True)
    store.save_dataset(ingest_source("twemoji", limit=limit))
    extract(store, "twemoji", ExtractConfig(encoders=encoders, shard_rows=64, progress=False))
    return store


def _run(store: FeatureStore, vision: str, text: str, objective: str, head: str, layers: str) -> str:
    options = FAST + ((("csa_ridge", 0.1),) if objective == "csa" else ())
    cfg = RunConfig(dataset="twemoji", vision=vision, text=text, layers=layers, objective=objective, head=head,
                    options=options if objective != "csa" else (("dim", 8), ("csa_ridge", 0.1)))
    return train_run(store, cfg)["run_id"]
