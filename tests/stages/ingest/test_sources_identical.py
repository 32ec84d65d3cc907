"""Byte-identical images (one content hash under several names) land in one split, and the ingest says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
from conftest import make_images

from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.datasets import split_of


def _table_with_copies(tmp_path: Path, n: int = 40, copied: int = 10, copies: int = 2) -> Path:
    """n distinct images, and `copies` extra copies (other file names, same bytes) of the first `copied`."""
    paths = make_images(tmp_path / "imgs", n)
    lines = ["image,caption"]
    for i, p in enumerate(paths):
        lines.append(f"imgs/{p.name},picture {i}")
        for c in range(copies if i < copied else 0):
            shutil.copy(p, tmp_path / "imgs" / f"copy{c}-{p.name}")
            lines.append(f"imgs/copy{c}-{p.name},copy {c} of picture {i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "t.csv"


def test_identical_images_share_one_split(tmp_path: Path) -> None:
    table = _table_with_copies(tmp_path)
    ds = ingest_source("table", "t", table=str(table), image_col="image", caption_col="caption", seed=0)
    # drawn per image id, as before, the copies would be spread over the splits
    spread = [i for i in range(10) if len({split_of(f"imgs/{pre}img{i:03d}.png", 0)
                                           for pre in ("", "copy0-", "copy1-")}) > 1]
    assert len(spread) >= 3
    per_hash = ds.images.group_by("sha").agg(pl.col("split").n_unique().alias("splits"), pl.len().alias("n"))
    assert per_hash["splits"].max() == 1 and sorted(per_hash["n"].to_list())[-10:] == [3] * 10
    assert ds.meta["identical_images"] == {"images": 30, "sets": 10, "across_given_splits": 0}
    assert ds.summary()["identical_images"] == 30
    # the copies are one group, so a carved validation split keeps them on one side too
    groups = ds.images.group_by("sha").agg(pl.col("group").n_unique())["group"]
    assert groups.max() == 1 and ds.images["group"].n_unique() == 40
    # an image without a twin keeps the split it always had
    lone = ds.images.filter(pl.col("image_id") == "imgs/img025.png")
    assert lone["split"][0] == split_of("imgs/img025.png", 0)


def test_dataset_without_twins_is_unchanged(tmp_path: Path) -> None:
    table = _table_with_copies(tmp_path, copied=0)
    ds = ingest_source("table", "t", table=str(table), image_col="image", caption_col="caption", seed=0)
    assert "identical_images" not in ds.meta and "group" not in ds.images.columns
    assert ds.images["split"].to_list() == [split_of(i, 0) for i in ds.images["image_id"].to_list()]


def test_given_split_is_kept_and_counted(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 4)
    shutil.copy(paths[0], tmp_path / "imgs" / "twin.png")
    (tmp_path / "t.csv").write_text("image,caption,split\nimgs/img000.png,a,train\nimgs/twin.png,b,test\n"
                                    "imgs/img001.png,c,train\nimgs/img002.png,d,val\nimgs/img003.png,e,test\n")
    ds = ingest_source("table", "t", table=str(tmp_path / "t.csv"), image_col="image", caption_col="caption",
                       split_col="split")
    assert ds.images["split"].to_list() == ["train", "test", "train", "val", "test"]
    assert ds.meta["identical_images"] == {"images": 2, "sets": 1, "across_given_splits": 1}


def test_ingest_command_reports_the_grouping(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    table = _table_with_copies(tmp_path)
    out = CliRunner().invoke(app, ["ingest", "table", "--table", str(table), "--name", "t",
                                   "--store", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert "grouped 30 byte-identical images (10 sets of one content hash)" in out.output
