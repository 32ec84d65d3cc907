"""`eval --dataset` on a dataset that shares test images (bytes) or captions (text) with the run's training pairs:
the overlap is measured, warned about, and the metrics on the unseen pairs are reported beside the whole.

Features come from the tiny deterministic encoders of fake_encoders.py over small labelled tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny
from PIL import Image

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.runs.data import split_run_tensors
from stratalign.stages.runs.training import RunConfig, train_run
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

LEVELS = ["dark", "dim", "mid", "bright", "white"]
FAST = (("max_steps", 40), ("patience", 20), ("eval_every", 5), ("warmup_steps", 10), ("dim", 16))


def _image(path: Path, i: int, rng: np.random.Generator) -> str:
    level = i % len(LEVELS)
    arr = np.clip(40 + 45 * level + rng.normal(0, 12, size=(12, 12, 3)), 0, 255).astype(np.uint8)
    arr[: (i % 7) + 2, :, 0] = 200
    Image.fromarray(arr).save(path)
    return LEVELS[level]


def _table(folder: Path, rows: list[tuple[str, str, str]], name: str, split: str | None = None) -> Path:
    lines = ["image,caption,label" + (",split" if split else "")]
    lines += [f"{im},{cap},{lab}" + (f",{split}" if split else "") for im, cap, lab in rows]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def _ingest(store: FeatureStore, table: Path, name: str, **kw) -> None:
    store.save_dataset(ingest_source("table", name, table=str(table), image_col="image", caption_col="caption",
                                     label_col="label", **kw))
    extract(store, name, ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=load_tiny)


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """(store, run id): a run on `toy`; `mix` (all test) holds 10 of its training images under other names and
    captions, 5 new images captioned with its training captions and 20 new pairs; `clean` holds those 20 only."""
    root = tmp_path_factory.mktemp("overlap")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = [(f"img/{i}.png", f"a {lab} square number {i}", lab)
            for i in range(100) for lab in [_image(root / "img" / f"{i}.png", i, rng)]]
    store = FeatureStore.open(str(root / "store"), "a", create=True)
    _ingest(store, _table(root, rows, "toy.csv"), "toy")
    rid = train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last",
                                     n_pairs=50, options=FAST))["run_id"]
    _, tensors, _ = RunRegistry(store).load(rid)
    ds = store.dataset("toy")
    trained = split_run_tensors(tensors)[1]
    seen_images = [ds.images["relpath"][int(r)] for r in np.unique(trained.image_rows)[:10]]
    seen_captions = [ds.captions["text"][int(r)] for r in trained.caption_rows[:5]]
    copies = []
    for k, rel in enumerate(seen_images):
        shutil.copy(root / rel, root / "img" / f"copy{k}.png")
        copies.append((f"img/copy{k}.png", f"another caption {k}", ds.images["label"][ds.images["relpath"].to_list()
                                                                                    .index(rel)]))
    fresh_rng = np.random.default_rng(1)
    fresh = [(f"img/new{i}.png", f"a fresh {lab} square {i}", lab)
             for i in range(25) for lab in [_image(root / "img" / f"new{i}.png", i, fresh_rng)]]
    reused = [(im, cap, lab) for (im, _, lab), cap in zip(fresh[:5], seen_captions)]
    _ingest(store, _table(root, copies + reused + fresh[5:], "mix.csv", split="test"), "mix", split_col="split")
    _ingest(store, _table(root, fresh[5:], "clean.csv", split="test"), "clean", split_col="split")
    return store, rid


def test_overlap_measured_and_unseen_metrics_reported(overlapping) -> None:
    from stratalign.stages.runs.evaluate import evaluate_saved_run

    store, rid = overlapping
    res = evaluate_saved_run(store, rid, "mix")
    assert res["overlap"] == {"test_images": 35, "images_trained_on": 10, "test_captions": 35,
                              "captions_trained_on": 5, "unseen_images": 20, "unseen_captions": 20}
    assert res["eval_images"] == 35 and res["unseen"]["eval_images"] == 20
    # the unseen part is scored exactly as a dataset holding only those pairs
    clean = evaluate_saved_run(store, rid, "clean")
    assert clean["overlap"]["images_trained_on"] == clean["overlap"]["captions_trained_on"] == 0
    assert "unseen" not in clean
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10", "zs_top1", "zs_balanced_acc", "alignment_mknn"):
        assert res["unseen"][key] == pytest.approx(clean[key], abs=1e-9), key
    stored = json.loads(Path(res["eval_file"]).read_text())
    assert stored["overlap"] == res["overlap"] and stored["unseen"] == res["unseen"]


def test_eval_command_warns_and_prints_both(overlapping) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    store, rid = overlapping
    out = CliRunner().invoke(app, ["eval", "--run", rid, "--dataset", "mix", "--store", store.url])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "warning: the test split shares 10 of its 35 images (same bytes) and 5 of its 35 captions" in text
    assert "on the 20 images / 20 captions the run never trained on:" in text
    assert text.count("i2t_R@1=") == 2
