"""The model verbs end to end: export, embed, index (built, then reused), search, classify; bad input is one line
and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from aligned_runs import _run, _store
from tiny_models import save_tiny_bert, save_tiny_vit

from stratalign.use.model import AlignedModel

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned_cli")
    vit, bert = "hf:" + str(save_tiny_vit(root / "vit", "vit")), "hf:" + str(save_tiny_bert(root / "bert"))
    store = _store(root, (vit, bert), 40)
    return store, _run(store, vit, bert, "clip", "linear", "last"), root


def test_export_then_embed_with_the_exported_model(model_store, tmp_path: Path) -> None:
    store, run_id, _ = model_store
    out = cli("export", "--run", run_id[:-3], "--out", str(tmp_path / "m"), "--store", store.url)
    assert out.returncode == 0, out.stderr
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["run_id"] == run_id and card["metrics"]["t2i_R@1"] is not None
    paths = store.dataset("twemoji").images["path"].to_list()[:2]
    res = cli("embed", "--model", str(tmp_path / "m"), "--images", paths[0], "--images", paths[1], "--texts", "a cat",
              "--out", str(tmp_path / "z.parquet"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    frame = pl.read_parquet(tmp_path / "z.parquet")
    assert frame["kind"].to_list() == ["image", "image", "text"]
    model = AlignedModel.from_run(store, run_id, device="cpu")
    z = np.array(frame["embedding"].to_list(), dtype=np.float32)
    np.testing.assert_array_equal(z[:2], model.encode_image(paths))


def test_index_is_kept_and_reused_and_search_finds_the_image_of_a_caption(model_store) -> None:
    store, run_id, _ = model_store
    first = cli("index", "--run", run_id, "--dataset", "twemoji", "--store", store.url, "--device", "cpu")
    assert first.returncode == 0 and "built index" in first.stdout, first.stderr
    again = cli("index", "--run", run_id, "--dataset", "twemoji", "--store", store.url, "--device", "cpu")
    assert again.returncode == 0 and "reused index" in again.stdout and "cached features" in again.stdout
    ds = store.dataset("twemoji")
    caption = ds.captions["text"][0]
    res = cli("search", caption, "--run", run_id, "--dataset", "twemoji", "-k", "3", "--store", store.url,
              "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "image"] and len(lines) == 4
    # the printed top hit is the argmax of the model's own similarity over every image of the dataset
    model = AlignedModel.from_run(store, run_id, device="cpu")
    sims = model.encode_text([caption]) @ model.encode_features(
        store.entry(model.card["towers"]["image"]["entry"]).read_layer(model.towers["image"].layer).astype(np.float32),
        "image").T
    assert lines[1].split()[2] == ds.images["image_id"][int(sims.argmax())]


def test_bad_input_is_one_line_and_nonzero(model_store, tmp_path: Path) -> None:
    store, run_id, _ = model_store
    for args, msg in ((["search", "  ", "--run", run_id, "--dataset", "twemoji"], "empty query"),
                      (["classify", str(tmp_path / "missing.png"), "--run", run_id, "--classes", "a,b"], "cannot be read"),
                      (["embed", "--out", str(tmp_path / "x.parquet"), "--run", run_id], "nothing to embed"),
                      (["export", "--run", "nosuchrun", "--out", str(tmp_path / "e")], "unknown")):
        res = cli(*args, "--store", store.url)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and msg in errors[0], res.stderr
