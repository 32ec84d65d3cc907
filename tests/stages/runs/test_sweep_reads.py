"""A sweep resolves once: each dataset table is decoded at most once and features/ is listed at most once per
store object, however many cells it has (issue 25: a sweep of N cells decoded them 6N times and listed
features/ 20 times). The store's reads are counted where they happen (store.location.Location)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny
from PIL import Image

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.evaluate import evaluate_saved_run
from stratalign.stages.runs.sweep import SweepConfig, run_sweep
from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import Location

FAST = (("max_steps", 20), ("patience", 10), ("eval_every", 5), ("warmup_steps", 5), ("dim", 8))


def _table(folder: Path, n: int = 60) -> Path:
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


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reads")
    store = FeatureStore.open(str(root / "store"), "a", create=True)
    store.save_dataset(ingest_source("table", "toy", table=str(_table(root)), image_col="image",
                                     caption_col="caption", label_col="label"))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=load_tiny)
    return store.url


class Reads:
    """Counts of the store's table decodes (datasets/<name>/<table>.parquet read) and features/ listings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tables: Counter[str] = Counter()
        self.listings = 0
        read_bytes, listdir, listdirs = Location.read_bytes, Location.listdir, Location.listdirs

        def counted_read(loc: Location, *parts: str, **kw):
            if len(parts) == 3 and parts[0] == "datasets" and parts[2].endswith(".parquet"):
                self.tables[f"{parts[1]}/{parts[2]}"] += 1
            return read_bytes(loc, *parts, **kw)

        def counted(real):
            def listing(loc: Location, *parts: str, **kw):
                if parts == ("features",):
                    self.listings += 1
                return real(loc, *parts, **kw)
            return listing

        monkeypatch.setattr(Location, "read_bytes", counted_read)
        monkeypatch.setattr(Location, "listdir", counted(listdir))
        monkeypatch.setattr(Location, "listdirs", counted(listdirs))


def _sweep(n_seeds: int) -> SweepConfig:
    base = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", options=FAST)
    return SweepConfig(base=base, seeds=tuple(range(n_seeds)), objectives=("clip", "clip+structure"),
                       layer_rules=("last", "0,0"))


def test_a_sweep_decodes_each_table_once_and_lists_features_once(store_url: str, monkeypatch) -> None:
    reads = Reads(monkeypatch)
    store = FeatureStore.open(store_url, "a")
    result = run_sweep(store, _sweep(2), progress=False)
    assert result.trained == 8 and result.runs.height == 8
    assert set(reads.tables.values()) == {1}, reads.tables  # images.parquet and captions.parquet, once each
    assert reads.listings <= 1
    again = FeatureStore.open(store_url, "a")  # every cell done: skipped, still read once
    reads.tables.clear()
    reads.listings = 0
    done = run_sweep(again, _sweep(3), progress=False)  # 4 cells more than before
    assert done.skipped == 8 and done.trained == 4
    assert max(reads.tables.values()) <= 1 and reads.listings <= 1


def test_evaluating_a_saved_run_decodes_its_dataset_once(store_url: str, monkeypatch) -> None:
    store = FeatureStore.open(store_url, "a")
    rid = run_sweep(store, _sweep(1), progress=False).run_ids[0]
    reads = Reads(monkeypatch)
    fresh = FeatureStore.open(store_url, "a")
    res = evaluate_saved_run(fresh, rid)
    assert res["i2t_R@1"] >= 0
    assert set(reads.tables.values()) == {1}, reads.tables
    assert reads.listings == 0  # the run names its entries: nothing is looked up
