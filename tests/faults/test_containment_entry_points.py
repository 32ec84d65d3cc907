"""One containment rule (store.containment) at every entry point that opens a path a store names: extract,
`store repair`, serve (`GET /image/<row>`), search output, embed, and exports. Each is fed a crafted
images.parquet row - an absolute path elsewhere, a `..` relative path, a symlink inside the image folder leading
out - and must refuse it naming the row (serve: 403), never reading the file outside."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from fake_encoders import load_tiny
from typer.testing import CliRunner

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.containment import DatasetMedia, OutsideRoots
from stratalign.store.feature_store import FeatureStore

ATTACKS = ["absolute-path", "dotdot-relpath", "symlink"]
ROW = 3
SECRET = b"secret bytes outside the image roots"


def _cfg() -> ExtractConfig:
    return ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=4, progress=False)


def _craft(store: FeatureStore, tmp_path: Path, attack: str) -> Path:
    """Point row ROW of the toy dataset at a file outside its image folder (the secret's bytes are a PNG, so
    only the rule can refuse it)."""
    ds_file = Path(store.url) / "datasets" / "toy" / "images.parquet"
    frame = pl.read_parquet(ds_file)
    paths, rels = frame["path"].to_list(), frame["relpath"].to_list()
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir(exist_ok=True)
    shutil.copy(paths[0], secret)
    root = Path(paths[ROW]).parent
    if attack == "absolute-path":
        paths[ROW] = str(secret)
    elif attack == "dotdot-relpath":
        rels[ROW] = os.path.relpath(secret, root)  # ../outside/secret.png
        paths[ROW] = os.path.join(root, rels[ROW])
    else:
        link = root / "link.png"
        link.symlink_to(secret)
        paths[ROW], rels[ROW] = str(link), "link.png"
    buf = io.BytesIO()
    frame.with_columns(pl.Series("path", paths), pl.Series("relpath", rels)).write_parquet(buf)
    ds_file.write_bytes(buf.getvalue())
    return secret


@pytest.fixture
def toy_run(store_with_dataset):
    """The toy dataset extracted with the tiny encoders and one trained run on it (before any crafting)."""
    from stratalign.stages.runs.training import RunConfig, train_run

    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    cfg = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", objective="clip",
                    head="linear", options=(("max_steps", 10), ("eval_every", 5), ("warmup_steps", 0), ("dim", 8)))
    return store, train_run(store, cfg)["run_id"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_rule_refuses_each_crafted_row(tmp_path: Path, store_with_dataset, attack: str) -> None:
    store, _ = store_with_dataset
    _craft(store, tmp_path, attack)
    media = DatasetMedia.of(FeatureStore.open(store.url, "r").dataset("toy"))
    assert media.path(ROW - 1) and media.reason(ROW) is not None
    with pytest.raises(OutsideRoots, match=rf"images.parquet row {ROW} .*outside the dataset's image roots") as err:
        media.path(ROW)
    assert err.value.row == ROW and "\n" not in str(err.value)


@pytest.mark.parametrize("attack", ATTACKS)
def test_extract_refuses_a_crafted_row(tmp_path: Path, store_with_dataset, attack: str) -> None:
    store, _ = store_with_dataset
    _craft(store, tmp_path, attack)
    with pytest.raises(StratalignError, match=rf"row {ROW} .*outside the dataset's image roots"):
        extract(FeatureStore.open(store.url, "a"), "toy", _cfg(), load=load_tiny)
    assert not list(Path(store.url).glob("features/*/_shards/*.json"))


@pytest.mark.parametrize("attack", ATTACKS)
def test_repair_refuses_a_crafted_row(tmp_path: Path, store_with_dataset, attack: str) -> None:
    from stratalign.stages.repair import repair_store

    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=8, batch_size=4, progress=False),
            load=load_tiny)
    [entry] = list(store.entries())
    chunk = next(p for p in sorted((Path(store.url) / "features" / entry.key / "layer_000").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # a damaged shard: repair will re-encode its rows
    _craft(store, tmp_path, attack)
    with pytest.raises(StratalignError, match=rf"row {ROW} .*outside the dataset's image roots"):
        repair_store(FeatureStore.open(store.url, "a"), load=load_tiny, progress=False)


@pytest.mark.parametrize("attack", ATTACKS + ["etc-hostname"])
def test_serve_answers_403_for_a_crafted_row(tmp_path: Path, toy_run, attack: str) -> None:
    """The issue's repro: a row pointing at /etc/hostname (or any crafted row) is not served; the others are."""
    pytest.importorskip("fastapi")
    from serve_client import serve_and_get

    from stratalign.use.model import AlignedModel
    from stratalign.use.service import Service

    store, run_id = toy_run
    if attack == "etc-hostname":
        if not Path("/etc/hostname").exists():
            pytest.skip("no /etc/hostname here")
        ds_file = Path(store.url) / "datasets" / "toy" / "images.parquet"
        frame = pl.read_parquet(ds_file)
        ds_file.write_bytes(_parquet(frame.with_columns(pl.Series("path", ["/etc/hostname", *frame["path"][1:]]))))
        row = 0
    else:
        _craft(store, tmp_path, attack)
        row = ROW
    fresh = FeatureStore.open(store.url, "a")
    service = Service(fresh, [AlignedModel.from_run(fresh, run_id, device="cpu", load=load_tiny)], "toy", warm=False)
    status, body = serve_and_get(service, [f"/image/{row}", f"/image/{row + 1}"])
    assert status[0] == 403 and b"outside the dataset's image roots" in body[0]
    assert SECRET not in body[0] and b"\x89PNG" not in body[0]
    assert status[1] == 200 and body[1][:4] == b"\x89PNG"


def _parquet(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    return buf.getvalue()


@pytest.mark.parametrize("attack", ATTACKS)
def test_search_output_refuses_a_crafted_row(tmp_path: Path, toy_run, attack: str) -> None:
    """`stratalign search` prints paths: a hit on a crafted row is refused naming it (the query is a caption of the
    dataset: its features come from the store, so no encoder loads)."""
    from stratalign.cli.main import app

    store, run_id = toy_run
    query = store.dataset("toy").captions["text"][0]
    ok = CliRunner().invoke(app, ["search", query, "--run", run_id, "--dataset", "toy", "-k", "30",
                                  "--store", store.url, "--device", "cpu"])
    assert ok.exit_code == 0 and len(ok.stdout.strip().splitlines()) == 31, ok.output
    _craft(store, tmp_path, attack)
    out = CliRunner().invoke(app, ["search", query, "--run", run_id, "--dataset", "toy", "-k", "30",
                                   "--store", store.url, "--device", "cpu"])
    assert isinstance(out.exception, OutsideRoots) and f"row {ROW}" in str(out.exception)


@pytest.mark.parametrize("attack", ATTACKS)
def test_embed_refuses_a_crafted_row(tmp_path: Path, toy_run, attack: str) -> None:
    from stratalign.cli.main import app

    store, run_id = toy_run
    ok = CliRunner().invoke(app, ["embed", "--dataset", "toy", "--run", run_id, "--out", str(tmp_path / "ok"),
                                  "--store", store.url, "--device", "cpu", "--no-progress"])
    assert ok.exit_code == 0 and "wrote 90 embeddings of dim 8 (90 from the store's cached features)" in ok.output, ok.output
    _craft(store, tmp_path, attack)
    out = CliRunner().invoke(app, ["embed", "--dataset", "toy", "--run", run_id, "--out", str(tmp_path / "e"),
                                   "--store", store.url, "--device", "cpu", "--no-progress"])
    assert isinstance(out.exception, OutsideRoots) and f"row {ROW}" in str(out.exception)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("attack", ["heads-symlink", "readme-symlink"])
def test_exports_are_not_read_or_written_through_a_symlink(tmp_path: Path, toy_run, attack: str) -> None:
    """An export folder is a root like the store's: a file in it that links outside is neither read (even with the
    very bytes the card names) nor written through."""
    from stratalign.use.model import AlignedModel

    store, run_id = toy_run
    model = AlignedModel.from_run(store, run_id, device="cpu", load=load_tiny)
    out = model.export(tmp_path / "export")
    name = "heads.safetensors" if attack == "heads-symlink" else "README.md"
    outside = tmp_path / "precious"
    outside.write_bytes((out / name).read_bytes() if attack == "heads-symlink" else SECRET)
    before = outside.read_bytes()
    (out / name).unlink()
    (out / name).symlink_to(outside)
    with pytest.raises(StratalignError, match="leads outside"):
        if attack == "heads-symlink":
            AlignedModel.load(out)
        else:
            model.export(out)
    assert outside.read_bytes() == before
