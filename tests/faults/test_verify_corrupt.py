"""Corruption of each artifact kind (issue 19): `store verify` names the damaged file in one line with the fix
(never a traceback, never "ok"), the read paths refuse it in one line or recompute it, and `store repair`
re-encodes exactly the damaged shards, byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import caption_for, make_images
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore

SHARD_ROWS = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store with dataset 'toy', both tiny encoders extracted, layers chosen, one short run, a prompt cache."""
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.stages.layers import LayersConfig, run_layers
    from stratalign.stages.runs.config import RunConfig
    from stratalign.stages.runs.training import train_run
    from stratalign.store import prompt_cache

    base = tmp_path_factory.mktemp("corrupt")
    make_images(base / "imgs", 30)
    images = [{"id": i, "file_name": f"img{i:03d}.png"} for i in range(30)]
    anns = [{"id": 100 + 2 * i + j, "image_id": i, "caption": caption_for(i, j)} for i in range(30) for j in range(2)]
    (base / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    store = FeatureStore.open(str(base / "store"), "a", create=True)
    store.save_dataset(ingest_source("coco", "toy", captions_json=str(base / "coco.json"), image_dir=str(base / "imgs")))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=SHARD_ROWS, batch_size=8,
                                        progress=False), load=load_tiny)
    run_layers(store, LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", n=20))
    train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="auto",
                               objective="clip+structure-knn",
                               options=(("max_steps", 20), ("batch_size", 16), ("dim", 8), ("eval_every", 5),
                                        ("warmup_steps", 5), ("knn_k", 3))))
    prompt_cache.save(store, "toy-prompts", [np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)],
                      ["a", "b", "c"])
    return base / "store"


@pytest.fixture
def store_copy(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "store", symlinks=True)
    return tmp_path / "store"


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
