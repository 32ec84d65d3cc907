"""`verify_store` as a library function: typed findings for broken datasets, broken entries, corrupt chunks and
incomplete shards, and a problem count (the CLI prints them; see tests/cli/test_main.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import break_entry
from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.feature_store import EntrySpec, FeatureStore
from stratalign.store.verify import Finding, verify_store


def _extracted(store: FeatureStore) -> str:
    extract(store, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False), load=load_tiny)
    return store.find_entry("toy", "tiny-image").key


def _spec(ds, pooling: str) -> EntrySpec:
    return EntrySpec(dataset="toy", content_fingerprint=ds.content_fingerprint, modality="image",
                     encoder={"spec": "enc"}, pooling=pooling, layer_names=("a", "b"), dims=(4, 6), rows=30,
                     shard_rows=8)


def test_clean_store_is_all_ok(store_with_dataset) -> None:
    store, ds = store_with_dataset
    key = _extracted(store)
    report = verify_store(FeatureStore.open(store.url, "r"))
    assert report.url == store.url and report.problems == 0 and report.ok
    assert report.findings == (
        Finding("dataset", "ok", "toy", f"{ds.images.height} images, {ds.captions.height} captions"),
        Finding("entry", "ok", key, "4 shards"),
    )


def test_corrupt_chunk_is_one_finding(store_with_dataset) -> None:
    store, _ = store_with_dataset
    key = _extracted(store)
    chunk = Path(store.url) / "features" / key / "layer_001" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x40
    chunk.write_bytes(bytes(data))
    report = verify_store(store)
    bad = [f for f in report.findings if f.status != "ok"]
    assert [(f.kind, f.status, f.target, f.shards, f.layer) for f in bad] == [("shard", "corrupt", key, (2,), 1)]
    assert bad[0].message and report.problems == 1 and not report.ok
    assert Finding("dataset", "ok", "toy", bad[0].message).problems == 0  # ok findings never count


def test_broken_dataset_and_entries(store_with_dataset) -> None:
    store, ds = store_with_dataset
    folder = Path(store.url)
    broken = store.create_entry(_spec(ds, "x")).key
    break_entry(folder / "features" / broken, "no-metadata")
    with open(folder / "datasets" / "toy" / "images.parquet", "r+b") as f:
        f.truncate(100)
    report = verify_store(store)
    by_target = {f.target: f for f in report.findings}
    assert by_target["toy"].kind == "dataset" and by_target["toy"].status == "broken"
    assert "unreadable" in by_target["toy"].message
    assert by_target[broken].kind == "entry" and by_target[broken].status == "broken"
    assert "has no zarr.json" in by_target[broken].message
    assert report.problems == 2


def test_incomplete_shards_count_one_each(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds, "mean"))
    a, b = entry.shard_rows_range(0)
    entry.write_shard(0, [np.zeros((b - a, 4)), np.zeros((b - a, 6))])
    report = verify_store(store)
    (finding,) = [f for f in report.findings if f.target == entry.key]
    assert (finding.kind, finding.status, finding.shards) == ("entry", "incomplete", (1, 2, 3))
    assert finding.message == "shards [1, 2, 3]" and report.problems == 3


def test_broken_features_group_is_reported(store_with_dataset) -> None:
    store, _ = store_with_dataset
    _extracted(store)
    (Path(store.url) / "features" / "zarr.json").write_text("{not json")
    report = verify_store(store)
    assert report.findings[1].kind == "group" and report.findings[1].status == "broken"
    assert report.findings[1].target == "features" and report.problems >= 1
