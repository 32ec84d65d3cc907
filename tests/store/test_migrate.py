"""`store migrate` on a copy of the store written by 3d4de15 (layout-1 entries): every entry becomes layout 2
under its own key with the same values and markers, the old runs and layer results are still found (nothing
re-extracted, recomputed or retrained), and a migration cut off before or during the swap loses nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny
from old_store import API, ENTRY_KEYS, FIXTURE, GEN, LAYER_KEY, RUN_IDS, _tree
from typer.testing import CliRunner

from stratalign.cli.main import app
from stratalign.errors import StratalignError
from stratalign.store import migrate
from stratalign.store.entry import FeatureEntry
from stratalign.store.verify import verify_store

KEY = sorted(ENTRY_KEYS)[0]


@pytest.fixture
def old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return tmp_path / "old"


def _values(store) -> dict:
    return {e.key: [e.read_layer(i) for i in range(len(e.spec.dims))] for e in store.entries()}


def _markers(root: Path) -> dict:
    return {k: v for k, v in _tree(root / "store").items() if "/_shards/" in k}


def test_migrate_keeps_keys_values_markers_runs(old: Path) -> None:
    store = API.FeatureStore.open("store", "a")
    values, markers = _values(store), _markers(old)
    recovered, done = migrate.migrate_store(store)
    assert recovered == [] and {m.key: m.action for m in done} == dict.fromkeys(ENTRY_KEYS, "migrated")
    store = API.FeatureStore.open("store", "a")
    assert {e.key for e in store.entries()} == ENTRY_KEYS and not (old / "store" / migrate.STAGING).exists()
    for entry in store.entries():
        assert (entry.spec.format_version, entry.spec.key_layout) == (2, 1) and entry.is_complete()
        for layer, want in enumerate(values[entry.key]):
            got = entry.read_layer(layer)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            rows = np.array([3, 0, 5])
            assert np.array_equal(entry.read_layer(layer, rows), want[rows])
    # verbatim, plus the crc32c of each new inner chunk (what a layout-2 read checks a shard file against)
    after = {k: json.loads(v) for k, v in _markers(old).items()}
    assert {k: {f: x for f, x in m.items() if f != "chunk_crc32c"} for k, m in after.items()} == {
        k: json.loads(v) for k, v in markers.items()}
    assert all(len(m["chunk_crc32c"]) == len(m["sha256"]) for m in after.values())
    report = verify_store(store)
    assert report.ok and sum(f.kind == "entry" and f.status == "ok" for f in report.findings) == 4
    before = _tree(old)
    for dataset in ("toy", "toy-resplit"):  # a new extraction (layout 2) finds the migrated entries
        reports = GEN.extract(API, store, dataset, load_tiny, entry_format=2)
        assert [r.shards_encoded for r in reports] == [0, 0] and {k for r in reports for k in r.entries} <= ENTRY_KEYS
    assert API.compute_layer_matrices(store, GEN.layers_config(API))["key"] == LAYER_KEY
    results = [API.train_run(store, cfg) for cfg in GEN.run_configs(API)]
    assert [r["run_id"] for r in results] == RUN_IDS and all(r["skipped"] for r in results)
    assert _tree(old) == before
    assert {m.action for m in migrate.migrate_store(store)[1]} == {"skipped"}  # already layout 2


def test_dry_run_and_cli(old: Path) -> None:
    before = _tree(old)
    out = CliRunner().invoke(app, ["store", "migrate", "--dry-run", "--store", "store"])
    assert out.exit_code == 0, out.output
    assert out.output.count("would migrate") == 5 and _tree(old) == before  # 4 entries + the count line
    out = CliRunner().invoke(app, ["store", "migrate", KEY, "--store", "store"])
    assert out.exit_code == 0 and f"migrated {KEY}" in out.output and "1 migrated" in out.output, out.output
    assert API.FeatureStore.open("store", "r").entry(KEY).spec.format_version == 2


@pytest.mark.parametrize("fault", ["old shard corrupt", "copy differs"])
def test_a_failed_check_leaves_the_entry(old: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    store = API.FeatureStore.open("store", "a")
    values = _values(store)[KEY]
    if fault == "old shard corrupt":  # the original's shards no longer match their markers
        monkeypatch.setattr(migrate, "shard_sha", lambda block: "0" * 64)
        match = "do not match their checksums"
    else:  # the copy is written with other values: caught when it is read back, before any swap
        real = FeatureEntry.write_shard
        monkeypatch.setattr(FeatureEntry, "write_shard", lambda self, s, blocks, info=None: real(
            self, s, [np.asarray(b, dtype=np.float32) + 1 for b in blocks], info))
        match = "differs at shard 0"
    with pytest.raises(StratalignError, match=match):
        migrate.migrate_store(store, (KEY,))
    monkeypatch.undo()
    monkeypatch.chdir(old)
    assert API.FeatureStore.open("store", "r").entry(KEY).spec.format_version == 1
    recovered, done = migrate.migrate_store(API.FeatureStore.open("store", "a"), (KEY,))
    assert recovered == [f"{KEY}: removed the leftovers in {migrate.STAGING}/{KEY}"] and done[0].action == "migrated"
    entry = API.FeatureStore.open("store", "r").entry(KEY)
    assert all(np.array_equal(entry.read_layer(i), v) for i, v in enumerate(values))


def test_a_cut_between_two_renames_is_completed(old: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an atomic exchange the swap is two renames; a crash between them leaves no features/<key>, and the
    next migrate puts the verified copy there."""
    store = API.FeatureStore.open("store", "a")
    values = _values(store)[KEY]
    real_rename, calls = os.rename, []

    def crash_on_second(a: str, b: str) -> None:
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_rename(a, b)

    monkeypatch.setattr(migrate, "_exchange", lambda a, b: False)
    monkeypatch.setattr(migrate.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        migrate.migrate_store(store, (KEY,))
    monkeypatch.undo()
    monkeypatch.chdir(old)
    assert not (old / "store" / "features" / KEY).exists()
    report = verify_store(API.FeatureStore.open("store", "r"))
    assert not report.ok and any("interrupted `store migrate`" in f.message for f in report.findings)
    recovered, done = migrate.migrate_store(API.FeatureStore.open("store", "a"), (KEY,))
    assert "the verified layout-2 copy put in place" in recovered[0] and done[0].action == "skipped"
    entry = API.FeatureStore.open("store", "r").entry(KEY)
    assert entry.spec.format_version == 2 and all(np.array_equal(entry.read_layer(i), v) for i, v in enumerate(values))
