"""Fixtures: tiny images, pair datasets and stores made inside the tests."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import stratalign` does, before numpy/torch load OpenMP
if not any(os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # as `import stratalign` does, before numpy loads OpenBLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


def make_images(folder: Path, n: int, seed: int = 0, size: int = 16) -> list[Path]:
    """n small random RGB PNGs (distinct content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


REQUIRE_EXTRAS = "STRATALIGN_REQUIRE_EXTRAS"  # set by .ci/run in the extras environment


def need(module: str) -> Any:
    """Import an optional package for a test: a skip where it is not installed, but a failure where
    $STRATALIGN_REQUIRE_EXTRAS is set (the extras CI environment, where every extras test must run)."""
    if os.environ.get(REQUIRE_EXTRAS):
        return importlib.import_module(module)
    return pytest.importorskip(module)


WORDS = ["red", "blue", "cat", "dog", "tree", "car", "sun", "moon", "fish", "bird", "house", "road"]


def caption_for(i: int, j: int = 0) -> str:
    return f"a {WORDS[i % len(WORDS)]} and a {WORDS[(i * 7 + j) % len(WORDS)]} number {i}"


def coco_toy_store(base: Path, shard_rows: int) -> Any:
    """A store under `base` holding dataset 'toy' (30 images in base/imgs, 60 captions from base/coco.json) with
    both tiny encoders extracted in shards of `shard_rows`: what the fault suites damage or feed bad input."""
    from fake_encoders import load_tiny

    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.feature_store import FeatureStore

    make_images(base / "imgs", 30)
    images = [{"id": i, "file_name": f"img{i:03d}.png"} for i in range(30)]
    anns = [{"id": 100 + 2 * i + j, "image_id": i, "caption": caption_for(i, j)} for i in range(30) for j in range(2)]
    (base / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    store = FeatureStore.open(str(base / "store"), "a", create=True)
    store.save_dataset(ingest_source("coco", "toy", captions_json=str(base / "coco.json"), image_dir=str(base / "imgs")))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=shard_rows, batch_size=8,
                                        progress=False), load=load_tiny)
    return store


@pytest.fixture(autouse=True)
def _signal_handlers():
    """The CLI's main() keeps its SIGINT/SIGTERM handlers for the process's shutdown (stratalign.cli.signals): put
    pytest's back after a test that ran it in-process."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    make_images(tmp_path / "imgs", 30)
    return tmp_path / "imgs"


@pytest.fixture
def coco_json(tmp_path: Path, image_dir: Path) -> Path:
    images = [{"id": i, "file_name": f"img{i:03d}.png"} for i in range(30)]
    anns = [{"id": 100 + 2 * i + j, "image_id": i, "caption": caption_for(i, j)} for i in range(30) for j in range(2)]
    p = tmp_path / "captions_train.json"
    p.write_text(json.dumps({"images": images, "annotations": anns}))
    return p


@pytest.fixture
def karpathy_json(tmp_path: Path, image_dir: Path) -> Path:
    splits = ["train"] * 20 + ["restval"] * 2 + ["val"] * 3 + ["test"] * 5
    images = [
        {"filename": f"img{i:03d}.png", "imgid": i, "split": splits[i],
         "sentences": [{"raw": caption_for(i, j), "sentid": 3 * i + j} for j in range(3)]}
        for i in range(30)
    ]
    p = tmp_path / "dataset_flickr30k.json"
    p.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return p


@pytest.fixture
def csv_table(tmp_path: Path, image_dir: Path) -> Path:
    lines = ["image,caption,label"]
    for i in range(30):
        lines.append(f"imgs/img{i:03d}.png,{caption_for(i)},{'even' if i % 2 == 0 else 'odd'}")
    p = tmp_path / "pairs.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def store_with_dataset(tmp_path: Path, coco_json: Path, image_dir: Path):
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    ds = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    store.save_dataset(ds)
    return store, ds


def break_entry(folder: Path, how: str) -> None:
    """Damage a feature entry's metadata: no-metadata, other-version or corrupt-json."""
    meta_file = folder / "zarr.json"
    if how == "no-metadata":
        meta_file.unlink()
    elif how == "other-version":
        meta = json.loads(meta_file.read_text())
        meta["attributes"]["stratalign_entry"]["format_version"] = 99
        meta_file.write_text(json.dumps(meta))
    elif how == "corrupt-json":
        meta_file.write_text('{"zarr_format": 3, "attri')


from corrupt_store import pristine, store_copy  # noqa: E402,F401 (the fault suite's damaged store and its copies)
