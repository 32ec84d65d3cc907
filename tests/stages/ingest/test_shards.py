"""Ingest at scale: webdataset tar shards (img2dataset's layout) and Hugging Face datasets, made inside the tests,
ingested, stored and extracted (the images are read from inside the tars / from the written image folder)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import caption_for, make_images
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.feature_store import FeatureStore
from stratalign.store.media import load_image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path, n_shards: int = 2, per_shard: int = 6) -> list[Path]:
    """img2dataset's output: per key NNNNNNNNN.png + .txt + .json; in each shard one key has its caption in the
    .json only and one has no caption at all (left out)."""
    pngs = make_images(folder / "src", n_shards * per_shard)
    shards = []
    for s in range(n_shards):
        shard = folder / f"shard-{s:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key = f"{i:09d}"
                _add(tar, f"{key}.png", pngs[i].read_bytes())
                meta = {"key": key, "status": "success"}
                if i % per_shard == 1:
                    meta["caption"] = caption_for(i)
                elif i % per_shard != 2:
                    _add(tar, f"{key}.txt", caption_for(i).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        shards.append(shard)
    return shards


def test_webdataset_tars_ingest_and_extract(tmp_path: Path) -> None:
    shards = _write_shards(tmp_path / "wds")
    ds = ingest_source("webdataset", "wds", shards=str(tmp_path / "wds" / "shard-{00000..00001}.tar"))
    assert ds.captions_file is not None and ds.n_captions == 10  # spilled as read: bounded memory at any scale
    assert ds.images.height == 10 and ds.captions.height == 10  # 2 of 12 keys had no caption
    assert "000000002" not in ds.images["image_id"].to_list() and "000000001" in ds.images["image_id"].to_list()
    assert ds.captions.filter(ds.captions["image_id"] == "000000001")["text"].to_list() == [caption_for(1)]
    row = ds.images.row(0, named=True)
    assert row["path"] == f"tar://{row['image_id']}.png::{shards[0]}" and row["relpath"].startswith("shard-00000.tar/")
    src = tmp_path / "wds" / "src" / "img000.png"
    assert np.array_equal(np.asarray(load_image(row["path"], row["sha"])), np.asarray(load_image(str(src))))
    again = ingest_source("webdataset", "wds", shards=[str(s) for s in shards])  # a list, or a glob: same dataset
    globbed = ingest_source("webdataset", "wds", shards=str(tmp_path / "wds" / "shard-*.tar"))
    assert again.fingerprint == ds.fingerprint == globbed.fingerprint
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    store.save_dataset(ds)
    cfg = ExtractConfig(encoders=("tiny-image",), shard_rows=4, batch_size=3, progress=False, loaders="processes")
    reports = extract(store, "wds", cfg, load=load_tiny)  # loader processes read the images out of the tars
    assert reports[0].shards_encoded == 3 and not reports[0].bad_rows
    assert store.find_entry("wds", "tiny-image").read_layer(0).shape[0] == 10


def test_webdataset_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(StratalignError, match="no webdataset shards match"):
        ingest_source("webdataset", "x", shards=str(tmp_path / "none-*.tar"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(StratalignError, match="is not a readable tar"):
        ingest_source("webdataset", "x", shards=str(tmp_path / "bad.tar"))
    with pytest.raises(StratalignError, match="webdataset shard not found"):
        ingest_source("webdataset", "x", shards=str(tmp_path / "missing.tar"))


def _pil_images(tmp_path: Path, n: int) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in make_images(tmp_path / "hfsrc", n)]


def test_hugging_face_dataset_folder_ingests_with_its_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="needs the Hugging Face `datasets` library")
    images = _pil_images(tmp_path, 9)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    parts = {"train": range(0, 6), "validation": range(6, 8), "test": range(8, 9)}
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [images[i] for i in idx], "text": [[caption_for(i, 0), caption_for(i, 1)] for i in idx]},
        features=features) for split, idx in parts.items()})
    dd.save_to_disk(str(tmp_path / "hfds"))
    ds = ingest_source("hf", "hfds", path=str(tmp_path / "hfds"))
    assert ds.captions_file is not None and ds.n_captions == 18  # spilled as read: bounded memory at any scale
    assert ds.images.height == 9 and ds.captions.height == 18
    assert ds.split_counts() == {"train": 6, "val": 2, "test": 1}
    first = ds.images.row(0, named=True)
    assert Path(first["path"]).parent == tmp_path / "hfds-images"
    np.testing.assert_array_equal(np.asarray(load_image(first["path"], first["sha"])), np.asarray(images[0]))
    assert ingest_source("hf", "hfds", path=str(tmp_path / "hfds")).fingerprint == ds.fingerprint  # rerun: same
    with pytest.raises(StratalignError, match="has no column 'caption' .*--text-col"):
        ingest_source("hf", "hfds", path=str(tmp_path / "hfds"), text_col="caption")


def test_parquet_with_an_image_struct_column(tmp_path: Path) -> None:
    """The Hub's Parquet layout (data/<split>-NNNNN-of-NNNNN.parquet, images as {bytes, path}), without `datasets`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = make_images(tmp_path / "src", 5)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split, idx in (("train", [0, 1, 2, 3]), ("test", [4])):
        table = pa.table({"image": [{"bytes": pngs[i].read_bytes(), "path": f"{i}.png"} for i in idx],
                          "caption": [caption_for(i) for i in idx]})
        pq.write_table(table, tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet")
    ds = ingest_source("hf", "pq", path=str(tmp_path / "pq"), text_col="caption", image_dir=str(tmp_path / "imgs"))
    assert ds.images.height == 5 and ds.split_counts()["test"] == 1 and ds.split_counts()["train"] == 4
    # one file per image, named by split and row (files in name order: test first)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["test-00000000.png",
                                                                     *(f"train-{i:08d}.png" for i in range(1, 5))]


def test_ingest_webdataset_cli(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", n_shards=1)
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "ingest", "webdataset",
                          str(tmp_path / "wds" / "shard-*.tar"), "--name", "w", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ingested" in out.stdout and FeatureStore.open(str(tmp_path / "store")).dataset("w").images.height == 5


def test_coco_streamed_and_loaded_whole_give_the_same_dataset(coco_json: Path, image_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ijson", reason="the streamed reader needs ijson (the ingest extra)")
    streamed = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    monkeypatch.setitem(sys.modules, "ijson", None)  # the reader falls back to json.load
    whole = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    assert streamed.fingerprint == whole.fingerprint and streamed.meta["source"] == whole.meta["source"]
    assert streamed.captions.height == 60


def test_webdataset_counts_every_member_it_leaves_out(tmp_path: Path) -> None:
    """`..` paths, links and caption-less images are not taken, and each is counted with its reason (the CLI
    prints them): a `..` member used to be ingested and refused only by extract, links dropped silently."""
    shard = tmp_path / "odd.tar"
    png = make_images(tmp_path / "src", 3)
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000.png", png[0].read_bytes())
        _add(tar, "000.txt", b"a kept pair")
        _add(tar, "../escape.png", png[1].read_bytes())
        _add(tar, "../escape.txt", b"climbs out")
        link = tarfile.TarInfo("001.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "001.txt", b"a caption whose image is a link")
        _add(tar, "002.png", png[2].read_bytes())  # no caption
        _add(tar, "README", b"no key.ext name")
    ds = ingest_source("webdataset", "odd", shards=str(shard))
    assert ds.images["image_id"].to_list() == ["000"]
    left = ds.meta["source"]["left_out"]
    assert {k: v["count"] for k, v in left.items()} == {
        "path outside the shard ('..' or absolute)": 2, "link or other non-file member": 1, "no <key>.<ext> name": 1,
        "image without a caption (.txt or .json)": 1, "caption without an image": 1}
    assert left["link or other non-file member"]["examples"] == ["001.png"]
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "ingest", "webdataset", str(shard),
                          "--name", "odd", "--store", str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("left out")]
    assert len(lines) == 5 and "left out 2 tar member(s): path outside the shard ('..' or absolute) (e.g. " \
        "../escape.png, ../escape.txt)" in lines


def test_webdataset_keeps_captionless_images_as_unpaired_rows(tmp_path: Path) -> None:
    """--keep-unpaired: a key with an image and no caption is an unpaired image (docs/method.md § 3.11), not left out:
    in the images table with a split, extracted, in no pair; without the flag it is left out, as before."""
    _write_shards(tmp_path / "wds")
    shards = str(tmp_path / "wds" / "shard-*.tar")
    plain = ingest_source("webdataset", "wds", shards=shards)
    ds = ingest_source("webdataset", "wds", shards=shards, keep_unpaired=True)
    assert plain.images.height == 10 and ds.images.height == 12 and ds.n_captions == 10
    assert ds.meta["unpaired"] == {"images": 2, "captions": 0} and "left_out" not in ds.meta["source"]
    assert ds.fingerprint != plain.fingerprint
    rows = [ds.images["image_id"].to_list().index(k) for k in ("000000002", "000000008")]
    assert not set(rows) & set(ds.pairs()[0].tolist()) and all(ds.images["split"][r] in ("train", "val", "test")
                                                               for r in rows)
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "ingest", "webdataset", shards, "--name", "w",
                          "--keep-unpaired", "--store", str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kept 2 image(s) without a caption and 0 caption(s) without an image as unpaired rows" in out.stdout
    extract(store, "w", ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False), load=load_tiny)
    assert store.find_entry("w", "tiny-image").read_layer(0).shape[0] == 12
    # a key with a caption and no image: a caption without an image, in a split of its own, in no pair
    shard = tmp_path / "one.tar"
    png = make_images(tmp_path / "one", 1)
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000.png", png[0].read_bytes())
        _add(tar, "000.txt", b"a kept pair")
        _add(tar, "001.txt", b"a caption alone")
    one = ingest_source("webdataset", "one", shards=str(shard), keep_unpaired=True)
    assert one.n_captions == 2 and one.meta["unpaired"] == {"images": 0, "captions": 1}
    assert one.pairs()[1].tolist() == [0] and one.captions["split"][1] in ("train", "val", "test")
