"""The feature store: layout, content addressing, checksums, safety and bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import break_entry

from stratalign.errors import StratalignError
from stratalign.store.feature_store import EntrySpec, FeatureStore
from stratalign.store.location import Location, validate_key


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


def test_layer_arrays_have_the_metadata_zarr_itself_writes(store_with_dataset, tmp_path: Path) -> None:
    """create_entry makes the first layer through zarr and copies its metadata for the others: each copy must
    be exactly the document zarr writes for that shape, chunking and name."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    store, ds = store_with_dataset
    spec = _spec(ds, layer_names=("a", "b", "c"), dims=(4, 6, 130), dtype="float32")
    store.create_entry(spec)
    scratch = zarr.open_group(str(tmp_path / "scratch"), mode="w")
    for i, (name, dim) in enumerate(zip(spec.layer_names, spec.dims)):
        scratch.create_array(f"l{i}", shape=(spec.rows, dim), chunks=(spec.shard_rows, dim), dtype=spec.dtype,
                             serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=float("nan"),
                             attributes={"layer_name": name})
        ours = json.loads((Path(store.url) / "features" / spec.key / f"layer_{i:03d}" / "zarr.json").read_text())
        assert ours == json.loads((tmp_path / "scratch" / f"l{i}" / "zarr.json").read_text())
    entry = store.create_entry(spec)  # opening the existing entry again
    full = _fill(entry)
    np.testing.assert_array_equal(store.features("toy", "enc", 2), full[2])
    meta_file = Path(store.url) / "features" / spec.key / "layer_002" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["shape"] = [spec.rows, 131]  # as a foreign writer might have left it
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StratalignError, match="layer 2 exists with another shape or dtype"):
        store.create_entry(spec)


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
        FeatureStore.open(str(tmp_path / "busy"), "a", create=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_other_format_version_rejected(tmp_path: Path) -> None:
    store = FeatureStore.open(str(tmp_path / "s"), "a", create=True)
    store.root.attrs["stratalign"] = {"kind": "stratalign-store", "format_version": 99, "created_by": "9.9"}
    with pytest.raises(StratalignError, match="format version 99.*reads version 1"):
        FeatureStore.open(str(tmp_path / "s"), "r")


def test_dataset_not_silently_overwritten(store_with_dataset, coco_json: Path, image_dir: Path) -> None:
    from stratalign.stages.ingest.sources import ingest_source

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
    from stratalign.stages.ingest.sources import ingest_source

    ds = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    store = FeatureStore.open("memory://stratalign-test-store", "a", create=True)
    store.save_dataset(ds)
    entry = store.create_entry(_spec(ds))
    full = _fill(entry)
    again = FeatureStore.open("memory://stratalign-test-store", "r")
    np.testing.assert_allclose(again.features("toy", "enc", 0), full[0], atol=1e-2)
    assert again.entry(entry.key).verify() == {"corrupt": [], "incomplete": []}


def test_open_creates_only_when_asked(tmp_path: Path) -> None:
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for path in (missing, empty):
        with pytest.raises(StratalignError, match=r"no stratalign store at .*create one with `stratalign ingest"):
            FeatureStore.open(str(path), "a")
    assert not missing.exists() and list(empty.iterdir()) == []  # nothing created at a mistyped path
    with pytest.raises(StratalignError, match="creating a store needs mode 'a'"):
        FeatureStore.open(str(missing), "r", create=True)
    assert not missing.exists()
    FeatureStore.open(str(missing), "a", create=True)
    assert FeatureStore.open(str(missing), "a").mode == "a"  # the README's mode="a" opens an existing store
    assert FeatureStore.open(str(missing), "a", create=True).mode == "a"  # create on an existing store: opens it


def test_dataset_name_is_part_of_the_key(store_with_dataset) -> None:
    _, ds = store_with_dataset
    a, b = _spec(ds, dataset="a+b"), _spec(ds, dataset="a-b")
    assert a.key.split("--")[0] == b.key.split("--")[0]  # the readable slug is lossy ...
    assert a.key != b.key  # ... the hash is not
    long = "x" * 70
    assert _spec(ds, dataset=long + "1").key != _spec(ds, dataset=long + "2").key  # slug cut at 60 chars


def test_entry_keyed_by_an_older_derivation_stays_readable(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    full = _fill(entry)
    root = Path(store.url) / "features"
    shutil.move(root / entry.key, root / "legacy-key")
    meta_file = root / "legacy-key" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["stratalign_entry"]["key"] = "legacy-key"
    meta_file.write_text(json.dumps(meta))
    old = store.entry("legacy-key")
    assert old.key == "legacy-key" and old.is_complete()
    np.testing.assert_allclose(old.read_layer(0), full[0], atol=1e-2)
    meta["attributes"]["stratalign_entry"]["key"] = "another"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StratalignError, match="holds the metadata of entry 'another'"):
        store.entry("legacy-key")



BREAKS = {"no-metadata": "has no zarr.json", "other-version": "format version 99",
          "corrupt-json": "corrupt JSON file .*zarr.json"}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_broken_entries_are_reported_and_removable(store_with_dataset, how: str) -> None:
    store, ds = store_with_dataset
    good = store.create_entry(_spec(ds, pooling="mean"))
    bad = store.create_entry(_spec(ds))
    break_entry(Path(store.url) / "features" / bad.key, how)
    scan = {key: (entry, why) for key, entry, why in store.scan_entries()}
    assert set(scan) == {good.key, bad.key} and scan[good.key][1] is None
    assert scan[bad.key][0] is None and re.search(BREAKS[how], scan[bad.key][1])
    assert [e.key for e in store.entries()] == [good.key]  # consumers still see the readable ones
    with pytest.raises(StratalignError, match=BREAKS[how]):
        store.entry(bad.key)
    table = {r["key"]: r for r in store.entry_table().iter_rows(named=True)}
    assert table[good.key]["status"] == "ok" and table[bad.key]["status"].startswith("broken: ")
    store.remove_entry(bad.key)
    assert not (Path(store.url) / "features" / bad.key).exists()
    assert [e.key for e in store.entries()] == [good.key]


def test_remove_entry_refuses_non_folders(store_with_dataset) -> None:
    store, _ = store_with_dataset
    for key in ("zarr.json", "nope", "../datasets"):
        with pytest.raises(StratalignError, match="no feature entry|invalid entry key"):
            store.remove_entry(key)
    assert (Path(store.url) / "features" / "zarr.json").exists()
    assert store.datasets() == ["toy"]


def test_corrupt_store_metadata_is_a_one_line_error(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    _fill(entry)
    layer_meta = Path(store.url) / "features" / entry.key / "layer_001" / "zarr.json"
    layer_meta.write_text("{not json")
    with pytest.raises(StratalignError, match=r"corrupt JSON file .*layer_001/zarr.json"):
        store.entry(entry.key).read_layer(1)
    assert [(s, layer) for s, layer, _ in store.entry(entry.key).verify()["corrupt"]] == [(s, 1) for s in range(4)]
    (Path(store.url) / "zarr.json").write_text("{")
    with pytest.raises(StratalignError, match=r"corrupt JSON file .*zarr.json") as err:
        FeatureStore.open(store.url, "r")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("failing", ["images.parquet", "captions.parquet", "dataset.json"])
def test_replace_crash_never_serves_new_tables_under_old_fingerprint(store_with_dataset, coco_json: Path,
                                                                     image_dir: Path, monkeypatch,
                                                                     failing: str) -> None:
    from stratalign.stages.ingest.sources import ingest_source

    store, old = store_with_dataset
    new = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir), seed=5)
    assert new.fingerprint != old.fingerprint and new.images.height == old.images.height
    assert new.captions_file is not None  # a COCO ingest's captions table is a file, copied by write_file

    def crashing(real):
        def crash(self: Location, data, *parts: str) -> None:
            if parts[-1] == failing:
                raise OSError("simulated crash")
            real(self, data, *parts)
        return crash

    monkeypatch.setattr(Location, "write_bytes", crashing(Location.write_bytes))
    monkeypatch.setattr(Location, "write_file", crashing(Location.write_file))
    with pytest.raises(OSError, match="simulated crash"):
        store.save_dataset(new, replace=True)
    monkeypatch.undo()
    try:
        loaded = store.dataset("toy")
    except StratalignError as exc:
        assert "no dataset.json" in str(exc) and "store rm --dataset toy" in str(exc)
    else:  # whatever loads must be the old dataset, whole
        assert loaded.fingerprint == old.fingerprint
        assert loaded.images.equals(old.images) and loaded.captions.equals(old.captions)
    assert store.save_dataset(new, replace=True) is True  # and the replace can simply be run again
    assert store.dataset("toy").fingerprint == new.fingerprint


def test_bad_rows_are_the_union_of_the_shard_markers(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    assert entry.bad_rows().dtype == np.int64 and entry.bad_rows().size == 0
    bad = {0: [5, 1], 2: [17], 3: []}
    for s in range(entry.spec.n_shards):
        a, b = entry.shard_rows_range(s)
        info = {"bad_rows": bad[s]} if s in bad else None
        entry.write_shard(s, [np.zeros((b - a, 4)), np.zeros((b - a, 6))], info)
    np.testing.assert_array_equal(store.entry(entry.key).bad_rows(), [1, 5, 17])
    marker = Path(store.url) / "features" / entry.key / "_shards" / "1.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "bad_rows": [99]}))
    with pytest.raises(StratalignError, match=r"1.json is damaged \(bad_rows outside the shard's rows 8..15\); "
                                              r"re-encode those shards with `stratalign store repair`"):
        store.entry(entry.key).bad_rows()


def test_broken_dataset_folder_refuses_to_load_and_can_be_removed(store_with_dataset) -> None:
    store, _ = store_with_dataset
    (Path(store.url) / "datasets" / "toy" / "dataset.json").unlink()
    assert store.dataset_folders() == ["toy"] and store.datasets() == []
    with pytest.raises(StratalignError, match="no dataset.json"):
        store.dataset("toy")
    store.remove_dataset("toy")
    assert store.dataset_folders() == [] and not (Path(store.url) / "datasets" / "toy").exists()


def test_images_read_alike_from_a_path_and_from_urls(tmp_path: Path) -> None:
    """Local paths skip fsspec (media.read_bytes); file:// and other URLs go through it: same image either way."""
    import fsspec
    from PIL import Image

    from stratalign.store.media import BadItem, load_image

    local = tmp_path / "a.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(local)
    with fsspec.open("memory://media-test/a.png", "wb") as f:
        f.write(local.read_bytes())
    want = np.asarray(load_image(str(local)))
    for url in (f"file://{local}", "memory://media-test/a.png"):
        np.testing.assert_array_equal(np.asarray(load_image(url)), want)
    with pytest.raises(BadItem, match=r"image x \(.*nope.png\) cannot be read: FileNotFoundError"):
        load_image(str(tmp_path / "nope.png"), image_id="x")
