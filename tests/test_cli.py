"""The CLI end to end on small fixtures: exit codes, one-line errors, and the store left intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, store: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stratalign.cli.main", *args]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("ingest", "extract", "layers", "train", "eval", "sweep", "demo", "store", "runs", "encoders"):
        assert cmd in out.stdout


def test_ingest_ls_verify_and_corruption(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    ok = run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    assert ok.returncode == 0, ok.stderr
    assert "images=30" in ok.stdout
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_encoders import load_tiny

    from stratalign.pipeline.extract import ExtractConfig, extract
    from stratalign.stores.feature_store import FeatureStore

    extract(FeatureStore.open(str(store), "a"), "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=8,
                                                                      progress=False), load=load_tiny)
    ls = run("store", "ls", store=store)
    assert ls.returncode == 0 and "tiny-image" in ls.stdout and "4/4" in ls.stdout
    assert run("store", "verify", store=store).returncode == 0
    chunk = next(store.glob("features/*/layer_001/c/2/0"))
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x40
    chunk.write_bytes(bytes(data))
    bad = run("store", "verify", store=store)
    assert bad.returncode != 0
    assert "corrupt" in bad.stdout and "shard 2 layer 1" in bad.stdout
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:")


@pytest.mark.parametrize("args, needle", [
    (("extract", "--dataset", "nope", "--encoder", "minilm-l6"), "dataset 'nope' not in store"),
    (("layers", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text"), "no features of tiny-image"),
    (("train", "--dataset", "toy", "--vision", "a", "--text", "b", "--objective", "magic"), "unknown objective"),
    (("eval", "--run", "zzz"), "run 'zzz' is unknown"),
])
def test_errors_are_one_line_and_nonzero(tmp_path: Path, coco_json: Path, image_dir: Path, args, needle) -> None:
    store = tmp_path / "store"
    run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    out = run(*args, store=store)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0


def test_unknown_encoder_lists_known_ones(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    out = run("extract", "--dataset", "toy", "--encoder", "resnet-9000", store=store)
    assert out.returncode == 2 and "resnet-9000" in out.stderr and "minilm-l6" in out.stderr


def test_bad_ingest_writes_nothing(tmp_path: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nimgs/img000.png,ok\nimgs/missing.png,gone\n")
    out = run("ingest", "table", "--table", str(table), "--name", "t", store=store)
    assert out.returncode == 2 and "missing file" in out.stderr and "missing.png" in out.stderr
    assert not (store / "datasets" / "t").exists()
    ok = run("ingest", "table", "--table", str(table), "--name", "t", "--skip-bad", store=store)
    assert ok.returncode == 0 and "skipped image" in ok.stdout
