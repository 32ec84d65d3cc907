"""The store stays inside itself (issue 19): no symlink in a crafted store is followed out of its root, image
paths from a dataset table are only read under the dataset's declared image roots, and a model folder holding a
pickled checkpoint is refused in one line without running it."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import polars as pl
import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry


def _cfg() -> ExtractConfig:
    return ExtractConfig(encoders=("tiny-image",), shard_rows=8, batch_size=4, progress=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious.txt").write_text("not the store's")
    return out


def test_symlinked_runs_folder_is_not_written_through(tmp_path: Path, store_with_dataset) -> None:
    import torch

    store, _ = store_with_dataset
    outside = _outside(tmp_path)
    os.symlink(outside, Path(store.url) / "runs")
    with pytest.raises(StratalignError, match="leads outside the store .*refusing to follow it"):
        RunRegistry(store).save("run-1", {"a": 1}, {"w": torch.zeros(2)}, {"m": 1})
    assert _snapshot(outside) == {"precious.txt": b"not the store's"}


def test_symlinked_dataset_folder_is_not_removed_or_replaced(tmp_path: Path, store_with_dataset) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    store, ds = store_with_dataset
    outside = _outside(tmp_path)
    shutil.copytree(Path(store.url) / "datasets" / "toy", outside / "toy")
    before = _snapshot(outside)
    os.symlink(outside / "toy", Path(store.url) / "datasets" / "evil")
    out = CliRunner().invoke(app, ["store", "rm", "--dataset", "evil", "--yes", "--store", store.url])
    assert out.exit_code != 0
    with pytest.raises(StratalignError, match="leads outside the store"):
        store.save_dataset(ds.__class__(name="evil", images=ds.images, captions=ds.captions, meta=ds.meta),
                           replace=True)
    with pytest.raises(StratalignError, match="leads outside the store"):
        store.dataset("evil")
    assert _snapshot(outside) == before


def test_symlinked_entry_folder_is_not_extracted_into(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    [entry] = list(store.entries())
    outside = _outside(tmp_path)
    folder = Path(store.url) / "features" / entry.key
    shutil.move(folder, outside / "entry")
    os.symlink(outside / "entry", folder)
    shutil.rmtree(outside / "entry" / "_shards")  # so that an extract would write every shard again
    before = _snapshot(outside)
    with pytest.raises(StratalignError, match="leads outside the store"):
        extract(FeatureStore.open(store.url, "a"), "toy", _cfg(), load=load_tiny)
    assert _snapshot(outside) == before


@pytest.mark.parametrize("link", ["shard-file", "shard-folder"])
def test_a_symlinked_shard_file_is_not_read(tmp_path: Path, store_with_dataset, link) -> None:
    """Layout-2 reads open shard files one path component at a time below the checked layer folder: a shard file
    (or its folder) swapped for a link to a file outside with the same bytes is refused, not read."""
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    [entry] = list(store.entries())
    assert entry.spec.format_version == 2
    shard = Path(store.url) / "features" / entry.key / "layer_000" / "c" / "0"
    outside = _outside(tmp_path)
    shutil.copytree(shard, outside / "0")
    shutil.rmtree(shard)
    if link == "shard-folder":
        os.symlink(outside / "0", shard)
    else:
        shard.mkdir()
        os.symlink(outside / "0" / "0", shard / "0")
    fresh = FeatureStore.open(store.url, "r")
    with pytest.raises(StratalignError, match="symlink"):
        fresh.entry(entry.key).read_layer(0, [0, 1])


def _edit_images(store: FeatureStore, change) -> None:
    path = Path(store.url) / "datasets" / "toy" / "images.parquet"
    frame = change(pl.read_parquet(path))
    buf = io.BytesIO()
    frame.write_parquet(buf)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("attack", ["absolute-path", "dotdot-relpath", "path-and-relpath-absolute"])
def test_image_paths_outside_the_declared_roots_are_refused(tmp_path: Path, store_with_dataset, attack) -> None:
    store, _ = store_with_dataset
    secret = tmp_path / "secret.png"
    shutil.copy(Path(store.dataset("toy").images["path"][0]), secret)

    def change(frame: pl.DataFrame) -> pl.DataFrame:
        paths, rels = frame["path"].to_list(), frame["relpath"].to_list()
        if attack == "absolute-path":
            paths[3] = str(secret)
        elif attack == "dotdot-relpath":
            root = str(Path(paths[3]).parent)
            rels[3] = "../secret.png"
            paths[3] = os.path.join(root, rels[3])
        else:
            paths[3] = rels[3] = str(secret)
        return frame.with_columns(pl.Series("path", paths), pl.Series("relpath", rels))

    _edit_images(store, change)
    with pytest.raises(StratalignError, match=r"images.parquet row 3 \(image 3\).*outside the dataset's image roots"):
        extract(FeatureStore.open(store.url, "a"), "toy", _cfg(), load=load_tiny)
    assert not list(Path(store.url).glob("features/*/_shards/*.json"))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_MARK', '/tmp/stratalign-payload-ran')}",))


def test_pickled_model_folder_is_refused_in_one_line_and_never_run(tmp_path: Path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from stratalign.encoders import load_encoder

    folder = tmp_path / "model"
    transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(folder)
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload()}))
    with pytest.raises(StratalignError) as err:
        load_encoder(f"hf:{folder}")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert not mark.exists()


def test_a_table_naming_absolute_paths_reads_only_the_folders_it_named(tmp_path: Path) -> None:
    """A table may name images by absolute path; ingest records their folders, and an images.parquet edited to
    point (path and relpath alike) at a file in another folder is refused, naming the row, before any read."""
    import numpy as np
    from PIL import Image

    from stratalign.stages.ingest.sources import ingest_source

    shots, secret_dir = tmp_path / "shots", tmp_path / "secret"
    shots.mkdir()
    secret_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(shots / f"{i}.png")
    shutil.copy(shots / "0.png", secret_dir / "secret.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{shots / f'{i}.png'},shot {i}\n" for i in range(12)))
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    ds = ingest_source("table", "toy", table=str(tmp_path / "pairs.csv"), image_col="image", caption_col="caption")
    assert ds.meta["source"]["absolute_dirs"] == [str(shots)]
    store.save_dataset(ds)
    secret = str(secret_dir / "secret.png")
    _edit_images(store, lambda f: f.with_columns(
        pl.Series("path", [secret, *f["path"].to_list()[1:]]), pl.Series("relpath", [secret, *f["relpath"].to_list()[1:]])))
    with pytest.raises(StratalignError, match=r"images.parquet row 0 .*outside the dataset's image roots"):
        extract(FeatureStore.open(store.url, "a"), "toy", _cfg(), load=load_tiny)


def test_tar_members_only_of_declared_webdataset_shards() -> None:
    """A webdataset image (tar://<member>::<shard>) is read only from a shard the dataset declared."""
    from stratalign.store.media import outside_roots

    roots = ["tar:/data/shard-0.tar"]
    assert not outside_roots("tar://k1.png::/data/shard-0.tar", "shard-0.tar/k1.png", roots)
    assert outside_roots("tar://k1.png::/data/other.tar", "other.tar/k1.png", roots)
    assert outside_roots("tar://../k1.png::/data/shard-0.tar", "shard-0.tar/../k1.png", roots)
    assert outside_roots("tar://k1.png::/data/shard-0.tar", "shard-0.tar/k1.png", ["/data"])
