"""Corruption of each artifact kind (issue 19): `store verify` names the damaged file in one line with the fix
(never a traceback, never "ok"), the read paths refuse it in one line or recompute it, and `store repair`
re-encodes exactly the damaged shards, byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore


def _image_entry(root: Path) -> Path:
    return next(p for p in (root / "features").iterdir() if "tiny-image" in p.name)


def _run(root: Path) -> Path:
    return next((root / "runs").iterdir())


def _one(root: Path, pattern: str) -> Path:
    return next(root.glob(pattern))


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _first_chunk(entry: Path) -> Path:
    return sorted(p for p in (entry / "layer_001").rglob("*") if p.is_file() and p.name != "zarr.json")[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage_record(root: Path) -> None:
    (root / "extract_records").mkdir(exist_ok=True)
    (root / "extract_records" / "0123456789abcdef01234567.json").write_text('{"garbage": 1}')


def _link_out(folder: Path) -> None:
    """Move a folder out of the store and leave a symlink to it in its place."""
    outside = folder.parents[2] / f"outside-{folder.name}"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)


def _flip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


# kind -> (damage, needle in the verify line, shards a repair re-encodes in the image entry or None)
DAMAGE = {
    "marker-without-sha256": (lambda r: _edit_json(_image_entry(r) / "_shards" / "1.json", lambda m: m.pop("sha256")),
                              "marker", [1]),
    "marker-not-json": (lambda r: (_image_entry(r) / "_shards" / "2.json").write_text("{half"), "marker", [2]),
    "marker-bad-rows-out-of-range": (lambda r: _edit_json(_image_entry(r) / "_shards" / "0.json",
                                                          lambda m: m.update(bad_rows=[999])), "bad_rows", [0]),
    "chunk-bit-flip": (lambda r: _flip(_first_chunk(_image_entry(r))), "corrupt", [0]),
    "shard-file-swapped": (lambda r: shutil.copyfile(_image_entry(r) / "layer_001" / "c" / "1" / "0",
                                                     _image_entry(r) / "layer_001" / "c" / "2" / "0"), "corrupt", [2]),
    "chunk-deleted": (lambda r: _first_chunk(_image_entry(r)).unlink(), "corrupt", [0]),
    "layer-folder-deleted": (lambda r: shutil.rmtree(_image_entry(r) / "layer_002"), "corrupt", [0, 1, 2, 3]),
    "entry-metadata-edited": (lambda r: _edit_json(_image_entry(r) / "zarr.json", lambda d: d["attributes"][
        "stratalign_entry"]["encoder"].update(weights_sha256="forged")), "hashes to", None),
    "entry-metadata-garbage": (lambda r: (_image_entry(r) / "zarr.json").write_text("\x00garbage"), "JSON", None),
    "prompt-cache-garbage": (lambda r: _one(r, "prompts/*.safetensors").write_bytes(b"garbage"), "prompts/", None),
    "layer-result-garbage": (lambda r: _one(r, "layers/*.json").write_text("[1, 2]"), "layers/", None),
    "layer-result-truncated": (lambda r: _edit_json(_one(r, "layers/*.json"), lambda d: d.pop("matrices")),
                               "matrices", None),
    "layer-choice-out-of-range": (lambda r: _edit_json(_one(r, "choices/*.json"), lambda d: d.update(vision_layer=-4)),
                                  "vision_layer", None),
    "layer-choice-missing-key": (lambda r: _edit_json(_one(r, "choices/*.json"), lambda d: d.pop("text_layer")),
                                 "text_layer", None),
    "graph-garbage": (lambda r: _flip(_one(r, "graphs/*.safetensors")), "graphs/", None),
    "run-config-missing-key": (lambda r: _edit_json(_run(r) / "config.json", lambda d: d.pop("vision_entry")),
                               "config.json", None),
    "run-config-garbage": (lambda r: (_run(r) / "config.json").write_text("nope"), "config.json", None),
    "run-weights-garbage": (lambda r: (_run(r) / "weights.safetensors").write_bytes(b"\x00" * 20), "weights", None),
    "run-metrics-not-object": (lambda r: (_run(r) / "metrics.json").write_text("[]"), "metrics.json", None),
    "run-eval-garbage": (lambda r: (_run(r) / "eval-other.json").write_text("[]"), "eval-other.json", None),
    "run-queries-garbage": (lambda r: (_run(r) / "queries.safetensors").write_bytes(b"junk"), "per-query", None),
    "dataset-table-deleted": (lambda r: (r / "datasets" / "toy" / "images.parquet").unlink(), "--replace", None),
    "dataset-json-garbage": (lambda r: (r / "datasets" / "toy" / "dataset.json").write_text("{"), "dataset.json",
                             None),
    "layer-shape-edited": (lambda r: _edit_json(_image_entry(r) / "layer_002" / "zarr.json", lambda d: d.update(
        shape=[31, 8])), "zarr.json does not describe layer 2", None),
    "dataset-folder-deleted": (lambda r: shutil.rmtree(r / "datasets" / "toy"), "datasets/toy is gone", None),
    "layer-choice-layer-99": (lambda r: _edit_json(_one(r, "choices/*.json"), lambda d: d.update(vision_layer=99)),
                              "names layers 99", None),
    "extract-record-garbage": (lambda r: _garbage_record(r), "extract_records/", None),
    "shard-zero-bytes": (lambda r: (_image_entry(r) / "layer_001" / "c" / "3" / "0").write_bytes(b""), "corrupt", [3]),
    "entry-folder-symlink": (lambda r: _link_out(_image_entry(r)), "is a symlink", None),
    "run-folder-symlink": (lambda r: _link_out(_run(r)), "is a symlink", None),
    "dataset-folder-symlink": (lambda r: _link_out(r / "datasets" / "toy"), "is a symlink", None),
    "shard-truncated": (lambda r: _truncate(_image_entry(r) / "layer_001" / "c" / "2" / "0"), "corrupt", [2]),
    "shard-from-another-layer": (lambda r: shutil.copyfile(_image_entry(r) / "layer_000" / "c" / "1" / "0",
                                                           _image_entry(r) / "layer_001" / "c" / "1" / "0"), "corrupt", [1]),
    "marker-rows-edited": (lambda r: _edit_json(_image_entry(r) / "_shards" / "3.json", lambda m: m.update(rows=[0, 8])),
                           "marker", [3]),
    "marker-crc-garbage": (lambda r: _edit_json(_image_entry(r) / "_shards" / "1.json",
                                                lambda m: m.update(chunk_crc32c=["x", "y", "z"])), "marker", [1]),
    "layer-dtype-edited": (lambda r: _edit_json(_image_entry(r) / "layer_001" / "zarr.json",
                                                lambda d: d.update(data_type="float32")), "dtype", None),
    "features-group-garbage": (lambda r: (r / "features" / "zarr.json").write_text("{"), "features", None),
}


def _verify(root: Path, monkeypatch, capsys) -> tuple[int, str]:
    from stratalign.cli.main import main

    monkeypatch.setattr(sys, "argv", ["stratalign", "store", "verify", "--store", str(root)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out + err


def test_pristine_store_verifies(pristine: Path, monkeypatch, capsys) -> None:
    code, out = _verify(pristine, monkeypatch, capsys)
    assert code == 0, out
    assert out.splitlines() == [out.strip()] and out.strip().endswith(": all ok")  # the summary line alone


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_by_verify_in_one_line(store_copy: Path, kind: str, monkeypatch, capsys) -> None:
    damage, needle, _ = DAMAGE[kind]
    damage(store_copy)
    code, out = _verify(store_copy, monkeypatch, capsys)
    assert code == 2, out
    assert "Traceback" not in out
    bad = [line for line in out.splitlines() if line.startswith(("broken", "corrupt"))]
    assert bad and any(needle in line for line in bad), out


@pytest.mark.parametrize("kind", [k for k, v in DAMAGE.items() if v[2] is not None])
def test_repair_reencodes_exactly_the_damaged_shards_byte_identical(store_copy: Path, pristine: Path, kind: str) -> None:
    from stratalign.stages.repair import repair_store
    from stratalign.store.verify import verify_store

    DAMAGE[kind][0](store_copy)
    store = FeatureStore.open(str(store_copy), "a")
    key = _image_entry(store_copy).name
    with pytest.raises(StratalignError):  # the read path refuses it in one line
        store.entry(key).read_layer(2 if kind == "layer-folder-deleted" else 1)
    report = repair_store(store, progress=False, load=load_tiny)
    assert report.repaired == {key: DAMAGE[kind][2]}
    assert verify_store(FeatureStore.open(str(store_copy), "r")).ok
    ref, got = FeatureStore.open(str(pristine), "r").entry(key), FeatureStore.open(str(store_copy), "r").entry(key)
    for i in range(3):
        assert got.read_layer(i).tobytes() == ref.read_layer(i).tobytes()
    assert sorted(p.name for p in (store_copy / "features" / key / "_shards").iterdir()) == [
        f"{s}.json" for s in range(4)]


def test_a_zero_byte_shard_is_named_by_the_read(store_copy: Path) -> None:
    """Was: "OSError: Invalid argument" (a read at a negative offset), naming no file."""
    DAMAGE["shard-zero-bytes"][0](store_copy)
    entry = FeatureStore.open(str(store_copy), "r").entry(_image_entry(store_copy).name)
    with pytest.raises(StratalignError, match=r"layer_001/c/3/0 holds 0 bytes, less than its index"):
        entry.read_layer(1, [25])


def test_linked_folders_are_listed_and_removed_as_links(store_copy: Path, monkeypatch, capsys) -> None:
    """Was: skipped silently by ls / verify / repair / rm --orphans, and `runs rm` said "no run"."""
    from stratalign.cli.main import main

    def cli(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["stratalign", *args, "--store", str(store_copy)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
        out, err = capsys.readouterr()
        return int(exit_.value.code or 0), out + err

    entry, run = _image_entry(store_copy), _run(store_copy)
    _link_out(entry)
    _link_out(run)
    code, out = cli("store", "ls")
    assert code == 0 and "is a symlink (to" in out and f"a symlink to {store_copy.parent / ('outside-' + run.name)}" in out
    code, out = cli("store", "repair")
    assert code == 2 and "cannot repair" in out and "symlink" in out, out
    code, out = cli("runs", "rm", run.name, "--yes")
    assert code == 0 and not run.is_symlink() and (store_copy.parent / f"outside-{run.name}" / "config.json").exists()
    code, out = cli("store", "rm", "--orphans", "--yes")
    assert code == 0 and not entry.is_symlink(), out
    assert (store_copy.parent / f"outside-{entry.name}" / "zarr.json").exists()  # the link went, never its target


def test_damaged_caches_are_recomputed_or_refused_in_one_line(store_copy: Path) -> None:
    from stratalign.stages.runs.config import RunConfig, resolve_run
    from stratalign.store import layer_results, prompt_cache
    from stratalign.store.runs import RunRegistry

    DAMAGE["prompt-cache-garbage"][0](store_copy)
    DAMAGE["layer-result-garbage"][0](store_copy)
    store = FeatureStore.open(str(store_copy), "a")
    assert prompt_cache.load(store, "toy-prompts", 2) is None  # recomputed by the caller, never a SafetensorError
    key = _one(store_copy, "layers/*.json").stem
    assert layer_results.load_result(store, key) is None
    DAMAGE["layer-choice-out-of-range"][0](store_copy)
    cfg = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="auto")
    with pytest.raises(StratalignError, match="choices/.*damaged.*--choose best"):
        resolve_run(store, cfg)
    _edit_json(_one(store_copy, "choices/*.json"), lambda d: d.update(vision_layer=7))
    with pytest.raises(StratalignError, match="names layers 7,.*record it again"):
        resolve_run(store, cfg)
    DAMAGE["run-config-missing-key"][0](store_copy)
    with pytest.raises(StratalignError, match="config.json is damaged .*vision_entry"):
        RunRegistry(store).load(_run(store_copy).name)


@pytest.mark.slow
def test_every_corruption_kind_fault_table(pristine: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Every kind of DAMAGE once more, end to end (verify names it in one line; a repairable kind is repaired
    byte-identically, any other leaves `store repair` non-zero), with the counts printed for the issue's table."""
    from stratalign.stages.repair import repair_store
    from stratalign.store.verify import verify_store

    failures = []
    for i, (kind, (damage, needle, shards)) in enumerate(DAMAGE.items()):
        root = tmp_path / f"k{i}"
        shutil.copytree(pristine, root, symlinks=True)
        damage(root)
        code, out = _verify(root, monkeypatch, capsys)
        bad = [line for line in out.splitlines() if line.startswith(("broken", "corrupt"))]
        if code != 2 or "Traceback" in out or not any(needle in line for line in bad):
            failures.append(f"{kind}: verify exit {code}: {out[-200:]!r}")
            continue
        try:
            report = repair_store(FeatureStore.open(str(root), "a"), progress=False, load=load_tiny)
        except StratalignError as exc:
            report = None
            why = str(exc)
        if shards is not None:
            ok = report is not None and not report.left and verify_store(FeatureStore.open(str(root), "r")).ok
            if not ok:
                failures.append(f"{kind}: not repaired ({report.left if report else why})")
        elif report is not None and not report.left and not report.unreadable:
            if not verify_store(FeatureStore.open(str(root), "r")).ok:
                failures.append(f"{kind}: repair said done while verify fails")
    print(f"\nfault table: corruption: {len(DAMAGE)} kinds, {len(DAMAGE)} trials, {len(failures)} failures")
    assert not failures, failures
