"""What a store object holds (a loaded dataset per fingerprint, the listing of features/) stays true: another
writer's dataset replacement and new entries are seen, this object's own writes drop what they change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.feature_store import EntrySpec, FeatureStore


def _complete_entry(store: FeatureStore, ds, encoder: str) -> str:
    spec = EntrySpec(dataset=ds.name, content_fingerprint=ds.content_fingerprint, modality="image",
                     encoder={"spec": encoder, "weights_sha256": "w"}, pooling="cls", layer_names=("a",), dims=(4,),
                     rows=ds.images.height, shard_rows=16)
    entry = store.create_entry(spec)
    data = np.ones((spec.rows, 4), dtype=np.float32)
    for s in entry.pending_shards():
        a, b = entry.shard_rows_range(s)
        entry.write_shard(s, [data[a:b]])
    return entry.key


def test_a_dataset_is_decoded_once_and_reloaded_when_replaced(store_with_dataset, coco_json: Path,
                                                              image_dir: Path) -> None:
    store, ds = store_with_dataset
    held = store.dataset("toy")
    assert store.dataset("toy") is held  # the tables are not decoded again
    assert store.dataset_meta("toy")["fingerprint"] == held.fingerprint
    other = FeatureStore.open(store.url, "a")  # another writer re-splits the dataset
    resplit = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir), seed=5)
    assert resplit.fingerprint != ds.fingerprint
    other.save_dataset(resplit, replace=True)
    again = store.dataset("toy")
    assert again is not held and again.fingerprint == resplit.fingerprint
    store.remove_dataset("toy")
    with pytest.raises(StratalignError, match="not in store"):
        store.dataset("toy")


def test_entries_are_listed_once_and_found_when_another_writer_adds_them(store_with_dataset,
                                                                        monkeypatch) -> None:
    store, ds = store_with_dataset
    first = _complete_entry(store, ds, "enc-a")
    listings = []
    real = FeatureStore.entry_folders
    monkeypatch.setattr(FeatureStore, "entry_folders", lambda self: listings.append(1) or real(self))
    assert store.find_entry("toy", "enc-a").key == first
    assert store.find_entry("toy", "enc-a").key == first and len(listings) == 1  # held
    other = FeatureStore.open(store.url, "a")
    second = _complete_entry(other, ds, "enc-b")
    assert store.find_entry("toy", "enc-b").key == second  # not in the held listing: listed again
    assert len(listings) == 2
    store.remove_entry(second)  # this object's own write drops its listing
    with pytest.raises(StratalignError, match="no features of enc-b"):
        store.find_entry("toy", "enc-b")
