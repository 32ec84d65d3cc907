"""A small labelled table dataset (5 brightness classes) with the tiny encoders' features, for run tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fake_encoders import load_tiny
from PIL import Image

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.feature_store import FeatureStore

FAST = (("max_steps", 20), ("patience", 10), ("eval_every", 5), ("warmup_steps", 5), ("dim", 8))


def toy_table(folder: Path, n: int = 60) -> Path:
    """n labelled images (5 brightness classes) with a caption each, as a CSV table."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption,label"]
    for i in range(n):
        level = i % 5
        arr = np.clip(40 + 45 * level + rng.normal(0, 12, size=(12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a square of level {level} number {i},c{level}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def store_of_table(root: Path, table: Path, shard_rows: int = 32) -> FeatureStore:
    """A store at root/store holding `table` (columns image, caption, label) as dataset 'toy', with its tiny-image
    and tiny-text features."""
    store = FeatureStore.open(str(root / "store"), "a", create=True)
    store.save_dataset(ingest_source("table", "toy", table=str(table), image_col="image", caption_col="caption",
                                     label_col="label"))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=shard_rows, progress=False),
            load=load_tiny)
    return store


def toy_store(root: Path, n: int = 60) -> FeatureStore:
    """A store at root/store with dataset 'toy' and the tiny-image / tiny-text features of it."""
    return store_of_table(root, toy_table(root, n))
