"""Entry layout 2 (store.shard_format): Zarr v3 sharding with small inner chunks, so a read of r rows touches O(r)
bytes, each chunk read checked against its crc32c; the files are what zarr itself reads and writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from stratalign.errors import StratalignError
from stratalign.store import shard_format
from stratalign.store.feature_store import LAYOUT_SHARDED, EntrySpec, FeatureStore


def _spec(ds, **kw) -> EntrySpec:
    base = dict(dataset=ds.name, content_fingerprint=ds.content_fingerprint, modality="image",
                encoder={"spec": "enc", "weights_sha256": "w1"}, pooling="cls", layer_names=("a", "b"),
                dims=(4, 6), rows=ds.images.height, shard_rows=8, format_version=LAYOUT_SHARDED)
    base.update(kw)
    return EntrySpec(**base)


def _fill(entry, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    full = [rng.normal(size=(entry.spec.rows, d)).astype(entry.spec.dtype) for d in entry.spec.dims]
    for s in entry.pending_shards():
        a, b = entry.shard_rows_range(s)
        entry.write_shard(s, [f[a:b] for f in full])
    return full


def _layer_dir(store: FeatureStore, entry, layer: int) -> Path:
    return Path(store.url) / "features" / entry.key / f"layer_{layer:03d}"


def test_layout_2_has_its_own_key_and_inner_chunks(store_with_dataset) -> None:
    _, ds = store_with_dataset
    v2, v1 = _spec(ds), _spec(ds, format_version=1)
    assert v2.key != v1.key and v2.chunk_rows == 4 and v1.chunk_rows == 0
    assert "chunk_rows" in v2.identity() and "chunk_rows" not in v1.identity()
    assert EntrySpec.from_json(v2.to_json()) == v2
    assert _spec(ds, shard_rows=6).chunk_rows == 2  # gcd(shard rows, 4): inner chunks always tile a shard
    with pytest.raises(StratalignError, match="chunk rows 3 must divide the shard rows 8"):
        _spec(ds, chunk_rows=3)
    with pytest.raises(StratalignError, match="unknown entry format 7"):
        _spec(ds, format_version=7)


def test_zarr_reads_what_we_write_and_we_read_what_zarr_writes(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds, dtype="float32"))
    full = _fill(entry)
    for layer, values in enumerate(full):
        arr = zarr.open_array(str(_layer_dir(store, entry, layer)), mode="r")
        assert arr.metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
        np.testing.assert_array_equal(arr[:], values)  # zarr decodes our shard files (crc32c checked by zarr)
    # zarr's own writer fills layer 1 anew: our reader gets zarr's bytes right
    other = np.random.default_rng(5).normal(size=full[1].shape).astype(np.float32)
    zarr.open_array(str(_layer_dir(store, entry, 1)), mode="r+")[:] = other
    again = FeatureStore.open(store.url, "r").entry(entry.key)
    np.testing.assert_array_equal(again.read_layer(1, verify=False), other)
    np.testing.assert_array_equal(again.read_layer(1, np.array([29, 0, 7, 7, 16]), verify=False),
                                  other[[29, 0, 7, 7, 16]])
    with pytest.raises(StratalignError, match="not the one its shard marker names"):  # not the values its markers name
        again.read_layer(1, np.array([7]))


def test_rows_in_any_order_and_repeats(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    full = _fill(entry, seed=1)
    rng = np.random.default_rng(2)
    for rows in (rng.integers(0, 30, size=50), np.array([29]), np.array([], dtype=np.int64), np.arange(30)[::-1]):
        got = entry.read_layer(0, rows)
        assert got.dtype == np.float16 and got.shape == (len(rows), 4)
        np.testing.assert_array_equal(got, full[0][rows])
    np.testing.assert_array_equal(entry.read_layer("b"), full[1])
    with pytest.raises(StratalignError, match="row index out of range"):
        entry.read_layer(0, np.array([30]))


def test_a_read_costs_what_it_returns(store_with_dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows of a 30-row layer: the indexes of the shards they sit in and their three inner chunks, nothing
    else (adjacent chunks of one file in one request)."""
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds, dims=(4, 64)))
    _fill(entry)
    read: list[int] = []
    real = shard_format.ByteSource.read_into

    def counting(self, shards, starts, outs):
        read.extend(o.size for o in outs)
        return real(self, shards, starts, outs)

    monkeypatch.setattr(shard_format.ByteSource, "read_into", counting)
    entry.read_layer(1, np.array([1, 2, 13, 25]))  # rows 1, 2 share an inner chunk; 3 chunks in 3 shards
    geo = shard_format.ShardGeometry(30, 64, "float16", 8, 4)
    assert sum(read) == 3 * shard_format.index_nbytes(2) + 3 * geo.chunk_nbytes
    read.clear()
    entry.read_layer(1)
    shard_file_bytes = sum(p.stat().st_size for p in _layer_dir(store, entry, 1).glob("c/*/*"))
    assert sum(read) == shard_file_bytes  # the whole layer: every byte once


def test_a_flipped_byte_fails_only_the_chunk_it_is_in(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    full = _fill(entry)
    shard_file = _layer_dir(store, entry, 0) / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[3] ^= 0x10  # inner chunk 0 of shard 1: rows 8..11
    shard_file.write_bytes(bytes(data))
    fresh = FeatureStore.open(store.url, "r").entry(entry.key)
    np.testing.assert_array_equal(fresh.read_layer(0, np.array([12, 0, 29])), full[0][[12, 0, 29]])
    with pytest.raises(StratalignError, match=r"corrupt chunk in .* layer 0 shard 1: inner chunk 0 fails its crc32c"):
        fresh.read_layer(0, np.array([9]))
    report = fresh.verify()
    assert report["incomplete"] == [] and [c[:2] for c in report["corrupt"]] == [(1, 0)]
    data[-2] ^= 0x01  # the index's own checksum
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StratalignError, match="shard 1: shard index fails its crc32c"):
        FeatureStore.open(store.url, "r").entry(entry.key).read_layer(0, np.array([12]))
    shard_file.unlink()
    with pytest.raises(StratalignError, match="shard file of .* layer 0 is missing"):
        FeatureStore.open(store.url, "r").entry(entry.key).read_layer(0, np.array([12]))


def test_a_complete_entry_of_the_other_layout_is_reused(store_with_dataset) -> None:
    store, ds = store_with_dataset
    old = store.create_entry(_spec(ds, format_version=1))
    assert store.create_entry(_spec(ds)).key == _spec(ds).key  # incomplete: not a twin to reuse
    store.remove_entry(_spec(ds).key)
    full = _fill(old)
    reused = store.create_entry(_spec(ds))
    assert reused.key == old.key and reused.spec.format_version == 1 and not store.entry_exists(_spec(ds).key)
    np.testing.assert_array_equal(reused.read_layer(1, np.array([3, 4])), full[1][[3, 4]])
    # both layouts present: readers prefer the newest
    _fill(store.create_entry(_spec(ds, shard_rows=4)), seed=0)
    assert store.find_entry("toy", "enc", "cls").spec.format_version == LAYOUT_SHARDED


def test_a_sweep_gathers_each_entry_layer_rows_once(store_with_dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from stratalign.stages.runs import data as run_data

    store, ds = store_with_dataset
    entry = store.create_entry(_spec(ds))
    full = _fill(entry)
    calls: list[int] = []
    real = type(entry).read_layer
    monkeypatch.setattr(type(entry), "read_layer", lambda self, layer, rows=None, **kw: calls.append(layer) or
                        real(self, layer, rows, **kw))
    rows = np.array([5, 1, 9])
    first = run_data.gather(entry, 1, rows)
    first[:] = 0  # a caller may scale its copy in place: the cache keeps the stored values
    again = run_data.gather(store.entry(entry.key), 1, rows.tolist())
    assert calls == [1] and again.dtype == np.float32
    np.testing.assert_array_equal(again, full[1][rows].astype(np.float32))
    run_data.gather(entry, 1, np.array([5, 1]))
    monkeypatch.setenv("STRATALIGN_GATHER_CACHE_MB", "0")
    run_data.gather(entry, 0, rows)
    run_data.gather(entry, 0, rows)
    assert calls == [1, 1, 0, 0]  # other rows are another read; a zero budget caches nothing
