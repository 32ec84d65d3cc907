"""kill -9 at random points of extract, ingest and train, then a rerun (issue 19): the rerun finishes the work,
the store verifies, and the result is byte-identical to an uninterrupted run; three concurrent extract processes
encode every shard exactly once. Long: marked slow (the CI suite has one kill -9 and two writers in
tests/stages/extract/test_local.py, and SIGINT/SIGTERM in tests/faults/test_pipeline_signals.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.feature_store import FeatureStore
from stratalign.store.verify import verify_store

HERE = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "fault_cli.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent), **(env or {})})


def kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process after `seconds` unless it ended first; True when it was killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _layers(store: FeatureStore, encoder: str) -> list[bytes]:
    return [store.features("toy", encoder, i).tobytes() for i in range(3 if encoder == "tiny-image" else 2)]


def test_kill9_of_extract_at_random_points_then_rerun(tmp_path: Path, store_with_dataset) -> None:
    """Each trial kills a fresh extraction at a random time (a whole run takes ~6-8 s: 15 batches of 0.3 s after
    start-up), then reruns it: the store verifies and holds the uninterrupted run's bytes."""
    _, ds = store_with_dataset
    reference = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    reference.save_dataset(ds)
    extract(reference, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=4, batch_size=2, progress=False),
            load=load_tiny)
    rng = random.Random(19)
    killed = 0
    for trial in range(4):
        store = FeatureStore.open(str(tmp_path / f"trial{trial}"), "a", create=True)
        store.save_dataset(ds)
        args = ("extract", "--dataset", "toy", "-e", "tiny-image", "--shard-rows", "4", "--batch-size", "2",
                "--store", store.url)
        killed += kill_after(cli(*args, env={"TINY_DELAY_S": "0.3"}), rng.uniform(1.0, 5.0))
        assert cli(*args).wait(timeout=120) == 0
        again = FeatureStore.open(store.url, "r")
        assert verify_store(again).ok
        assert _layers(again, "tiny-image") == _layers(reference, "tiny-image")
    assert killed >= 3  # the kills landed while the extraction was running


def test_kill9_of_train_at_random_points_then_rerun(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=4,
                                        progress=False), load=load_tiny)
    args = ("train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
            "--objective", "clip+structure-knn", "--set", "max_steps=60", "--set", "batch_size=16", "--set", "dim=8",
            "--set", "knn_k=3", "--set", "warmup_steps=10", "--store", store.url)
    rng = random.Random(7)
    for _ in range(5):
        kill_after(cli(*args), rng.uniform(1.5, 8.0))
    done = cli(*args)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    again = FeatureStore.open(store.url, "r")
    report = verify_store(again)
    assert report.ok, [f for f in report.findings if f.status != "ok"]
    runs = [p for p in (Path(store.url) / "runs").iterdir() if (p / "metrics.json").exists()]
    assert len(runs) == 1 and {"config.json", "weights.safetensors", "metrics.json"} <= {p.name for p in runs[0].iterdir()}
    from stratalign.store.cleanup import collect

    collect(again.loc)  # whatever temp files the kills left, gc removes them
    assert not list(Path(store.url).rglob("*.tmp-*"))


def test_kill9_of_ingest_at_random_points_then_rerun(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    root = tmp_path / "store"
    args = ("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy",
            "--store", str(root))
    rng = random.Random(3)
    for _ in range(6):
        kill_after(cli(*args), rng.uniform(0.5, 4.0))
    assert cli(*args).wait(timeout=120) == 0
    store = FeatureStore.open(str(root), "r")
    assert store.datasets() == ["toy"] and verify_store(store).ok


def test_three_concurrent_extracts_encode_each_shard_once(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    args = ("extract", "--dataset", "toy", "-e", "tiny-image", "--shard-rows", "2", "--batch-size", "2",
            "--store", store.url)
    procs = [cli(*args, env={"TINY_DELAY_S": "0.05"}) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    markers = [json.loads(p.read_text()) for p in Path(store.url).glob("features/*/_shards/*.json")]
    assert sorted(m["shard"] for m in markers) == list(range(15))
    assert len({m["pid"] for m in markers}) >= 2  # the work was shared
    assert verify_store(FeatureStore.open(store.url, "r")).ok
    assert not list(Path(store.url).glob("features/*/_claims/*.json"))
