"""Shard markers hold each layout-2 shard file to what was written (issue 29): the crc32c of every inner chunk in
the marker; markers written before they carried it fall back to the whole shard's sha256; a malformed crc32c
field is a damaged marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratalign.errors import StratalignError
from stratalign.store.feature_store import EntrySpec, FeatureStore
from stratalign.store.shard_markers import CHUNK_CRCS


def _entry(store: FeatureStore, ds, rows: int = 30):
    spec = EntrySpec(dataset=ds.name, content_fingerprint=ds.content_fingerprint, modality="image",
                     encoder={"spec": "enc"}, pooling="avg", layer_names=("a", "b"), dims=(4, 3), rows=rows,
                     shard_rows=8, format_version=2)
    entry = store.create_entry(spec)
    rng = np.random.default_rng(0)
    full = [rng.standard_normal((rows, d)).astype(np.float16) for d in spec.dims]
    for s in range(spec.n_shards):
        a, b = entry.shard_rows_range(s)
        entry.write_shard(s, [f[a:b] for f in full])
    return entry, full


def _folder(store: FeatureStore, entry) -> Path:
    return Path(store.url) / "features" / entry.key


def test_markers_name_each_chunk_and_older_markers_fall_back_to_sha256(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry, full = _entry(store, ds)
    folder = _folder(store, entry)
    marker = json.loads((folder / "_shards" / "3.json").read_text())
    assert len(marker[CHUNK_CRCS]) == 2  # shard 3 holds rows 24..29: two inner chunks of 4 rows per layer
    for s in range(4):  # markers as written before issue 29: no chunk crc32c
        path = folder / "_shards" / f"{s}.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != CHUNK_CRCS}))
    old = FeatureStore.open(store.url, "r").entry(entry.key)
    np.testing.assert_array_equal(old.read_layer(0, np.array([3, 17, 9])), full[0][[3, 17, 9]])
    shutil.copyfile(folder / "layer_000" / "c" / "0" / "0", folder / "layer_000" / "c" / "1" / "0")
    old = FeatureStore.open(store.url, "r").entry(entry.key)
    np.testing.assert_array_equal(old.read_layer(0, np.array([3, 17])), full[0][[3, 17]])  # shards 0 and 2 intact
    with pytest.raises(StratalignError, match="shard 1: its values do not match its marker's sha256"):
        old.read_layer(0, np.array([9]))


def test_a_malformed_crc_field_is_a_damaged_marker(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry, _ = _entry(store, ds)
    path = _folder(store, entry) / "_shards" / "2.json"
    marker = json.loads(path.read_text())
    marker[CHUNK_CRCS][1] = "AAAA"
    path.write_text(json.dumps(marker))
    report = FeatureStore.open(store.url, "r").entry(entry.key).verify()
    assert report["corrupt"] == [(2, None, f"{CHUNK_CRCS} of layer 1 does not hold 2 crc32c")]
