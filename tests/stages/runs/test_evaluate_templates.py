"""`ingest table --template ...` reaches the zero-shot numbers (validation, evaluation) and the export.

Two versions of one labelled table, ingested through the CLI with the default template and with two of their own;
features from the tiny deterministic encoders of fake_encoders.py (their text layer counts characters, so other
templates give other prompt features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_encoders import load_tiny
from PIL import Image
from typer.testing import CliRunner

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.runs.training import RunConfig, train_run
from stratalign.store.feature_store import FeatureStore

LEVELS = ["dark", "dim", "mid", "bright", "white"]
FAST = (("max_steps", 40), ("patience", 20), ("eval_every", 5), ("warmup_steps", 10), ("dim", 16))
OWN = ["zzz qq {} vvv.", "{}, kkk jj"]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    from stratalign.cli.main import app

    root = tmp_path_factory.mktemp("templates")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,caption,label"]
    for i in range(100):
        level = i % len(LEVELS)
        arr = np.clip(40 + 45 * level + rng.normal(0, 12, size=(12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a {LEVELS[level]} square with {(i % 7) + 2} rows,{LEVELS[level]}")
    (root / "t.csv").write_text("\n".join(lines) + "\n")
    store_url = str(root / "store")
    base = ["ingest", "table", "--table", str(root / "t.csv"), "--label-col", "label", "--store", store_url]
    for name, extra in (("plain", []), ("own", [a for t in OWN for a in ("--template", t)])):
        out = CliRunner().invoke(app, [*base, "--name", name, *extra])
        assert out.exit_code == 0, out.output
    store = FeatureStore.open(store_url, "a")
    for name in ("plain", "own"):
        extract(store, name, ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
                load=load_tiny)
    return store, root


def _cfg(dataset: str) -> RunConfig:
    return RunConfig(dataset=dataset, vision="tiny-image", text="tiny-text", layers="last", n_pairs=50, options=FAST)


def test_templates_change_the_zero_shot_prompts_and_numbers(two_versions) -> None:
    from stratalign.stages.prompts import class_prompts, prompt_features
    from stratalign.stages.runs.evaluate import evaluate_saved_run

    store, _ = two_versions
    plain, own = store.dataset("plain"), store.dataset("own")
    assert own.templates == OWN and plain.templates == ["a photo of a {}."]
    assert own.content_fingerprint == plain.content_fingerprint and own.fingerprint != plain.fingerprint
    _, _, prompts = class_prompts(own)
    assert prompts[:2] == ["zzz qq bright vvv.", "bright, kkk jj"]  # class-major
    text_entry = store.complete_entries("own", "tiny-text", "mean", "text")[0]
    feats_own = prompt_features(text_entry, prompts)[1]
    feats_plain = prompt_features(store.complete_entries("plain", "tiny-text", "mean", "text")[0],
                                  class_prompts(plain)[2])[1]
    assert feats_own.shape == (10, 6) and feats_plain.shape == (5, 6)
    # one model, one test split (same content, same seed): only the prompts differ
    run = train_run(store, _cfg("plain"))
    on_plain = evaluate_saved_run(store, run["run_id"])
    on_own = evaluate_saved_run(store, run["run_id"], "own")
    assert on_own["i2t_R@1"] == on_plain["i2t_R@1"] and on_own["t2i_R@5"] == on_plain["t2i_R@5"]
    zs = ("zs_top1", "zs_top5", "zs_balanced_acc")
    assert [on_own[k] for k in zs] != [on_plain[k] for k in zs]
    # a run trained on the templated version validates and evaluates with its templates, under its own id
    own_run = train_run(store, _cfg("own"))
    assert own_run["run_id"] != run["run_id"]
    assert evaluate_saved_run(store, own_run["run_id"])["zs_top1"] == pytest.approx(own_run["zs_top1"])


def test_export_carries_the_templates_and_class_names(two_versions) -> None:
    from stratalign.cli.main import app

    store, root = two_versions
    rid = train_run(store, _cfg("own"))["run_id"]
    out = CliRunner().invoke(app, ["export", "--run", rid, "--out", str(root / "export"), "--store", store.url])
    assert out.exit_code == 0, out.output
    card = json.loads((root / "export" / "model.json").read_text())
    assert card["zero_shot"] == {"dataset": "own", "classes": sorted(LEVELS), "templates": OWN}
