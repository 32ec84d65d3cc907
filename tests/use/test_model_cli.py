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


def test_embed_folders_globs_and_list_files_to_npy_and_parquet(model_store, tmp_path: Path) -> None:
    store, run_id, _ = model_store
    paths = store.dataset("twemoji").images["path"].to_list()[:6]
    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    copies = [folder / "a.png", folder / "sub" / "b.png"]
    for src, dst in zip(paths[:2], copies):
        dst.write_bytes(Path(src).read_bytes())
    (folder / "notes.md").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{paths[2]}\n{paths[3]}\n")
    (tmp_path / "texts.txt").write_text("a red heart\n\na grinning face\n")
    res = cli("embed", "--run", run_id, "--images", str(folder), "--images", str(Path(paths[4]).parent / "1f60*.png"),
              "--images", str(listing), "--text-file", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "out"),
              "--store", store.url, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    meta = pl.read_parquet(tmp_path / "out" / "metadata" / "img_metadata_0.parquet")
    z = np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy")
    items = meta["image_path"].to_list()
    assert items[:2] == [str(copies[0]), str(copies[1])] and items[-2:] == paths[2:4] and len(z) == len(items)
    in_dataset = set(store.dataset("twemoji").images["path"].to_list()) | {str(c) for c in copies}
    # a file with the bytes of a dataset image is read from the cached features, any other one encoded
    assert meta["from_store"].to_list() == [i in in_dataset for i in items] and 0 < sum(meta["from_store"]) < len(items)
    model = AlignedModel.from_run(store, run_id, device="cpu")
    np.testing.assert_allclose(z, model.encode_image(items), atol=3e-3)
    zt = np.load(tmp_path / "out" / "text_emb" / "text_emb_0.npy")
    assert pl.read_parquet(tmp_path / "out" / "metadata" / "text_metadata_0.parquet")["caption"].to_list() == [
        "a red heart", "a grinning face"]
    np.testing.assert_array_equal(zt, model.encode_text(["a red heart", "a grinning face"]))


def test_classify_prints_top_k_with_probabilities(model_store) -> None:
    store, run_id, _ = model_store
    path = store.dataset("twemoji").images["path"][0]
    res = cli("classify", path, "--run", run_id, "--classes", "cat,dog,face", "-k", "3", "--store", store.url,
              "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability", "score"] and len(lines) == 4
    probs = [float(line.split()[3]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 2e-3
    top = AlignedModel.from_run(store, run_id, device="cpu").classify([path], ["cat", "dog", "face"]).top(3)[0]
    assert [line.split()[2] for line in lines[1:]] == [c for c, _, _ in top]
