"""The feature store: layout, content addressing, checksums, safety and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from stratalign.errors import StratalignError
from stratalign.stores.feature_store import EntrySpec, FeatureStore
from stratalign.stores.location import validate_key


def _spec(ds, **kw) -> EntrySpec:
    base = dict(dataset=ds.name, content_fingerprint=ds.content_fingerprint, modality="image",
                encoder={"spec": "enc", "weights_sha256": "w1"}, pooling="cls", layer_names=("a", "b"),
                dims=(4, 6), rows=ds.images.height, shard_rows=8)
    base.update(kw)
    return EntrySpec(**base)


def _fill(entry, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    full = [rng.normal(size=(entry.spec.rows, d)).astype(np.float32) for d in entry.spec.dims]
    for s in entry.pending_shards():
        a, b = entry.shard_rows_range(s)
        entry.write_shard(s, [f[a:b] for f in full])
    return full


def test_roundtrip_and_rows(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    assert entry.pending_shards() == [0, 1, 2, 3]
    full = _fill(entry)
    assert entry.is_complete()
    got = store.features("toy", "enc", 1)
    assert got.dtype == np.float16 and got.shape == (30, 6)
    np.testing.assert_allclose(got, full[1], rtol=1e-3, atol=1e-3)
    rows = np.array([3, 0, 29])
    np.testing.assert_array_equal(store.features("toy", "enc", "a", rows=rows), got_a := store.features("toy", "enc", 0)[rows])
    assert got_a.shape == (3, 4)
    # reopening read-only sees the same entry
    ro = FeatureStore.open(store.url, "r")
    np.testing.assert_array_equal(ro.features("toy", "enc", -1), got)


def test_one_layer_read_touches_only_its_chunks(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    _fill(entry)
    folder = Path(store.url) / "features" / entry.key
    layer_files = {p.parents[2].name for p in folder.glob("layer_*/c/*/*")}
    assert layer_files == {"layer_000", "layer_001"}
    assert len(list((folder / "layer_000" / "c").glob("*/*"))) == entry.spec.n_shards  # one chunk per shard


def test_content_addressed_keys(store_with_dataset) -> None:
    _, ds = store_with_dataset
    base = _spec(ds)
    assert _spec(ds).key == base.key
    for change in ({"encoder": {"spec": "enc", "weights_sha256": "w2"}}, {"pooling": "mean"},
                   {"dtype": "float32"}, {"content_fingerprint": "other"}, {"shard_rows": 16}):
        assert _spec(ds, **change).key != base.key, change


def test_verify_catches_flipped_byte(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    _fill(entry)
    assert entry.verify() == {"corrupt": [], "incomplete": []}
    chunk = Path(store.url) / "features" / entry.key / "layer_001" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x01
    chunk.write_bytes(bytes(data))
    report = entry.verify()
    assert [(s, layer) for s, layer, _ in report["corrupt"]] == [(2, 1)]
    with pytest.raises(StratalignError, match="corrupt chunk"):
        store.features("toy", "enc", 1)
    np.testing.assert_array_equal(store.features("toy", "enc", 0).shape, (30, 4))  # other layer still readable


def test_deleted_chunk_is_caught(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    _fill(entry)
    (Path(store.url) / "features" / entry.key / "layer_000" / "c" / "1" / "0").unlink()
    assert entry.verify()["corrupt"][0][:2] == (1, 0)
    with pytest.raises(StratalignError, match="checksum"):
        store.features("toy", "enc", 0)


def test_incomplete_entry_not_read(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    a, b = entry.shard_rows_range(0)
    entry.write_shard(0, [np.zeros((b - a, 4)), np.zeros((b - a, 6))])
    assert entry.verify()["incomplete"] == [1, 2, 3]
    with pytest.raises(StratalignError, match="incomplete.*stratalign extract --dataset toy --encoder enc"):
        store.features("toy", "enc", 0)


def test_float16_overflow_and_nan_rejected(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    with pytest.raises(StratalignError, match="beyond float16.*--dtype float32"):
        entry.write_shard(0, [np.full((8, 4), 1e5), np.zeros((8, 6))])
    bad = np.zeros((8, 6))
    bad[3, 2] = np.nan
    with pytest.raises(StratalignError, match="NaN/inf.*rows 3"):
        entry.write_shard(0, [np.zeros((8, 4)), bad])
    assert entry.pending_shards() == [0, 1, 2, 3]  # nothing half-written counts as done
    e32 = store.create_entry(_spec(ds, dtype="float32"))
    e32.write_shard(0, [np.full((8, 4), 1e5), np.zeros((8, 6))])
    assert e32.done_shards() == [0]


def test_layer_index_errors(store_with_dataset) -> None:
    store, ds = store_with_dataset
    _fill(store.create_entry(_spec(ds)))
    with pytest.raises(StratalignError, match=r"layer index 5 out of range.*valid 0\.\.1"):
        store.features("toy", "enc", 5)
    with pytest.raises(StratalignError, match="layer 'zz' not in enc"):
        store.features("toy", "enc", "zz")


def test_missing_features_say_which_extract_to_run(store_with_dataset) -> None:
    store, _ = store_with_dataset
    with pytest.raises(StratalignError, match="run: stratalign extract --dataset toy --encoder nope"):
        store.features("toy", "nope", 0)


def test_open_rejects_non_stores(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StratalignError, match="is a file"):
        FeatureStore.open(str(f), "a")
    with pytest.raises(StratalignError, match="no stratalign store"):
        FeatureStore.open(str(tmp_path / "none"), "r")
    zarr.open_group(str(tmp_path / "foreign"), mode="a").attrs["x"] = 1
    with pytest.raises(StratalignError, match="not a stratalign store"):
        FeatureStore.open(str(tmp_path / "foreign"), "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StratalignError, match="non-empty folder"):
        FeatureStore.open(str(tmp_path / "busy"), "a")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_other_format_version_rejected(tmp_path: Path) -> None:
    store = FeatureStore.open(str(tmp_path / "s"), "a")
    store.root.attrs["stratalign"] = {"kind": "stratalign-store", "format_version": 99, "created_by": "9.9"}
    with pytest.raises(StratalignError, match="format version 99.*reads version 1"):
        FeatureStore.open(str(tmp_path / "s"), "r")


def test_dataset_not_silently_overwritten(store_with_dataset, coco_json: Path, image_dir: Path) -> None:
    from stratalign.stores.sources import ingest_source

    store, ds = store_with_dataset
    assert store.save_dataset(ds) is False  # identical: nothing to do
    other = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir), seed=5)
    with pytest.raises(StratalignError, match="already exists.*--replace"):
        store.save_dataset(other)
    assert store.dataset("toy").fingerprint == ds.fingerprint
    assert store.save_dataset(other, replace=True) is True
    assert store.dataset("toy").fingerprint == other.fingerprint


@pytest.mark.parametrize("key", ["../evil", "a/b", "..", "", "x" * 300, "/abs"])
def test_keys_validated(key: str, store_with_dataset) -> None:
    store, _ = store_with_dataset
    with pytest.raises(StratalignError, match="invalid"):
        validate_key(key)
    with pytest.raises(StratalignError):
        store.entry(key)


def test_entry_table(store_with_dataset) -> None:
    store, ds = store_with_dataset
    e = store.create_entry(_spec(ds))
    _fill(e)
    t = store.entry_table()
    assert t.row(0, named=True)["shards"] == "4/4" and t["bytes"][0] > 30 * 10 * 2


def test_fsspec_memory_url(coco_json: Path, image_dir: Path) -> None:
    """The store works through fsspec URLs as well as local paths (memory:// stands in for s3://)."""
    from stratalign.stores.sources import ingest_source

    ds = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    store = FeatureStore.open("memory://stratalign-test-store", "a")
    store.save_dataset(ds)
    entry = store.create_entry(_spec(ds))
    full = _fill(entry)
    again = FeatureStore.open("memory://stratalign-test-store", "r")
    np.testing.assert_allclose(again.features("toy", "enc", 0), full[0], atol=1e-2)
    assert again.entry(entry.key).verify() == {"corrupt": [], "incomplete": []}
