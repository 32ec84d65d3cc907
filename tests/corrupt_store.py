"""The store the fault suite damages: dataset 'toy' (30 images, 60 captions), both tiny encoders extracted in shards
of 8 rows, layers chosen, one short run, a prompt cache (built once per module); `store_copy` is a fresh copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny

from stratalign.store.feature_store import FeatureStore

SHARD_ROWS = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store with dataset 'toy', both tiny encoders extracted, layers chosen, one short run, a prompt cache."""
    from conftest import caption_for, make_images

    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.stages.layers import LayersConfig, run_layers
    from stratalign.stages.runs.config import RunConfig
    from stratalign.stages.runs.training import train_run
    from stratalign.store import prompt_cache

    base = tmp_path_factory.mktemp("corrupt")
    make_images(base / "imgs", 30)
    images = [{"id": i, "file_name": f"img{i:03d}.png"} for i in range(30)]
    anns = [{"id": 100 + 2 * i + j, "image_id": i, "caption": caption_for(i, j)} for i in range(30) for j in range(2)]
    (base / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    store = FeatureStore.open(str(base / "store"), "a", create=True)
    store.save_dataset(ingest_source("coco", "toy", captions_json=str(base / "coco.json"), image_dir=str(base / "imgs")))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=SHARD_ROWS, batch_size=8,
                                        progress=False), load=load_tiny)
    run_layers(store, LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", n=20))
    train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="auto",
                               objective="clip+structure-knn",
                               options=(("max_steps", 20), ("batch_size", 16), ("dim", 8), ("eval_every", 5),
                                        ("warmup_steps", 5), ("knn_k", 3))))
    prompt_cache.save(store, "toy-prompts", [np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)],
                      ["a", "b", "c"])
    return base / "store"


@pytest.fixture
def store_copy(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "store", symlinks=True)
    return tmp_path / "store"
