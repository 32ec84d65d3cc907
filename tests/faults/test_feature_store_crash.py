"""Crash-safe creation and clean-up (issue 19): a store that an interrupted `ingest` left half-created is
recognised, named in one line, and finished by the next ingest; temp files are cleaned by the next writer and
by `store gc`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore

GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}
HALF = {  # what a kill at each point of FeatureStore._create leaves
    "root-untagged": {"zarr.json": json.dumps(GROUP)},
    "root-empty": {"zarr.json": ""},
    "root-cut-short": {"zarr.json": '{"attributes": {"strata'},
    "features-only": {"features/zarr.json": json.dumps(GROUP)},
    "untagged-and-features": {"zarr.json": json.dumps(GROUP), "features/zarr.json": json.dumps(GROUP),
                              "zarr.json.tmp-123": "x"},
}


@pytest.mark.parametrize("state", list(HALF))
def test_half_created_store_is_named_and_finished_by_the_next_ingest(tmp_path: Path, state, capsys) -> None:
    root = tmp_path / "store"
    for rel, text in HALF[state].items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    with pytest.raises(StratalignError, match="half-created stratalign store .* rerun `stratalign ingest"):
        FeatureStore.open(str(root), "r")
    store = FeatureStore.open(str(root), "a", create=True)
    assert "finishing the store" in capsys.readouterr().err
    assert FeatureStore.open(str(root), "r").entry_folders() == [] and store.datasets() == []
    assert sorted(p.name for p in root.iterdir()) == ["features", "zarr.json"]


def test_a_folder_with_other_files_is_never_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "zarr.json").write_text(json.dumps(GROUP))
    (root / "mine.txt").write_text("someone's file")
    with pytest.raises(StratalignError, match="not a stratalign store"):
        FeatureStore.open(str(root), "a", create=True)
    assert (root / "mine.txt").read_text() == "someone's file"


@pytest.mark.slow
def test_kill9_of_ingest_while_creating_never_leaves_an_unusable_store(tmp_path: Path, coco_json: Path,
                                                                       image_dir: Path) -> None:
    """Kill the creating ingest as soon as the root zarr.json appears, at several delays; the next ingest works."""
    here = Path(__file__).resolve().parents[1]
    for trial, delay in enumerate((0.0, 0.002, 0.005, 0.01, 0.02)):
        root = tmp_path / f"store{trial}"
        cmd = [sys.executable, str(here / "fault_cli.py"), "ingest", "coco", "--captions", str(coco_json),
               "--images", str(image_dir), "--name", "toy", "--store", str(root)]
        env = {**os.environ, "PYTHONPATH": str(here.parent)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not (root / "zarr.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert FeatureStore.open(str(root), "r").datasets() == ["toy"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_dead_writers_are_cleaned_by_the_next_writer_and_gc(tmp_path: Path, store_with_dataset) -> None:
    from fake_encoders import load_tiny
    from typer.testing import CliRunner

    from stratalign.cli.main import app
    from stratalign.stages.extract import ExtractConfig, extract

    store, _ = store_with_dataset
    root = Path(store.url)
    cfg = ExtractConfig(encoders=("tiny-image",), shard_rows=8, batch_size=4, progress=False)
    extract(store, "toy", cfg, load=load_tiny)
    [entry] = list(store.entries())
    dead = _dead_pid()
    shard_tmp = root / "features" / entry.key / "_shards" / f"0.json.tmp-{dead}"
    dataset_tmp = root / "datasets" / "toy" / f"dataset.json.tmp-{dead}"
    root_tmp = root / f"zarr.json.tmp-{dead}-7"
    live_tmp = root / "features" / entry.key / "_shards" / f"1.json.tmp-{os.getppid()}"  # a live writer's
    for p in (shard_tmp, dataset_tmp, root_tmp, live_tmp):
        p.write_text("half")
    store.create_entry(entry.spec)  # what the next extract of this entry does first
    assert not shard_tmp.exists() and live_tmp.exists()
    store.save_dataset(store.dataset("toy"))  # the next ingest of this dataset
    assert not dataset_tmp.exists()
    runner = CliRunner()
    listed = runner.invoke(app, ["store", "gc", "--dry-run", "--store", store.url])
    assert listed.exit_code == 0 and str(root_tmp) in listed.output and root_tmp.exists()
    done = runner.invoke(app, ["store", "gc", "--store", store.url])
    assert done.exit_code == 0 and "1 temp file(s)" in done.output
    assert not root_tmp.exists() and live_tmp.exists()


def test_full_disk_names_the_file_in_one_line_and_leaves_no_temp(tmp_path: Path, coco_json: Path, image_dir: Path,
                                                                 monkeypatch, capsys) -> None:
    import errno

    from stratalign.cli.main import main

    real_fsync = os.fsync

    def full(fd: int) -> None:
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write on a full disk: no file name

    root = tmp_path / "store"
    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(sys, "argv", ["stratalign", "ingest", "coco", "--captions", str(coco_json), "--images",
                                      str(image_dir), "--name", "toy", "--store", str(root)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert "No space left on device" in err and str(root / "datasets" / "toy") in err
    assert not list(root.rglob("*.tmp-*"))
