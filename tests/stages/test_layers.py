"""The layers stage with its permutation null: the calibration lives in the result file (same key), the choice
carries the chosen pair's calibrated score and p-values, the CLI prints them, and a result saved before
calibration existed keeps its key and gains the null when the stage runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_encoders import load_tiny

from stratalign.core import calibration
from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.layers import LayersConfig, compute_layer_matrices, run_layers
from stratalign.store import layer_results


@pytest.fixture
def store(store_with_dataset):
    fs, _ = store_with_dataset
    extract(fs, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    return fs


def _cfg(**kw) -> LayersConfig:
    return LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("mutual_knn", "cka"), k=4,
                        **kw)


def test_the_stage_calibrates_in_the_result_file_without_changing_its_key(store) -> None:
    raw_only = compute_layer_matrices(store, _cfg())  # what an older version saved: no calibration
    assert "calibration" not in raw_only
    done = run_layers(store, _cfg(permutations=50), "best", "mutual_knn")
    res = done.result
    assert res["key"] == raw_only["key"] and res["matrices"] == raw_only["matrices"]
    cal = res["calibration"]
    assert cal["permutations"] == 50 and set(cal["metrics"]) == {"mutual_knn"}  # cka has no kNN-graph null
    saved = layer_results.load_result(store, res["key"])
    assert saved["calibration"] == cal  # kept beside the raw matrices
    summary = cal["metrics"]["mutual_knn"]
    mat = np.asarray(res["matrices"]["mutual_knn"])
    np.testing.assert_allclose(np.asarray(summary["calibrated"]), mat - np.asarray(summary["null_mean"]))
    ps = np.asarray(summary["p"])
    assert ((ps >= 1 / 51) & (ps <= 1)).all() and (np.asarray(summary["family_p"]) >= ps - 1e-12).all()
    choice = done.choice
    v, t = choice["vision_layer"], choice["text_layer"]
    assert choice["calibrated_score"] == pytest.approx(summary["calibrated"][v][t])
    assert choice["family_p"] == pytest.approx(summary["family_p"][v][t]) and choice["permutations"] == 50
    recorded = layer_results.load_choice(store, "toy", "tiny-image", "tiny-text")
    assert recorded["p_value"] == choice["p_value"]
    again = run_layers(store, _cfg(permutations=50), "best", "mutual_knn")
    assert again.result["cached"] and again.choice == choice
    other = run_layers(store, _cfg(permutations=20), "best", "mutual_knn")  # another K: computed again, same key
    assert not other.result["cached"] and other.result["calibration"]["permutations"] == 20
    assert other.result["key"] == res["key"]


def test_the_choice_uses_the_first_metric_asked_when_the_result_is_read_back(store) -> None:
    first = run_layers(store, _cfg(permutations=10), "best")
    again = run_layers(store, _cfg(permutations=10), "best")  # saved with its matrices in sorted order: cka first
    assert again.result["cached"] and first.choice["metric"] == again.choice["metric"] == "mutual_knn"


def test_no_calibration_when_asked_none(store) -> None:
    done = run_layers(store, _cfg(permutations=0), "best", "mutual_knn")
    assert "calibration" not in done.result and "calibrated_score" not in done.choice
    for bad, why in ((1, "at least 2"), (-3, "--permutations")):
        with pytest.raises(StratalignError, match=why):
            _cfg(permutations=bad)


def test_the_null_equals_the_module_on_the_same_rows(store) -> None:
    """The stage's null is core.calibration's on the sampled rows, with the sample's seed."""
    from stratalign.core import similarity
    from stratalign.stages.layers import _entries, sample_train_pairs

    cfg = _cfg(permutations=30, seed=3)
    res = run_layers(store, cfg, "best", "mutual_knn").result
    v, t = _entries(store, cfg)
    img, cap, _ = sample_train_pairs(store, "toy", cfg.n, cfg.seed, (v, t))
    vis = [v.read_layer(i, img).astype(np.float32) for i in range(len(v.spec.dims))]
    txt = [t.read_layer(i, cap).astype(np.float32) for i in range(len(t.spec.dims))]
    raw, graphs = similarity.layer_similarity_and_graphs(vis, txt, ("mutual_knn",), k=4)
    null = calibration.overlap_null(*graphs, calibration.permutations(len(img), 30, 3))["mutual_knn"]
    want = calibration.summarise(raw["mutual_knn"], null)
    assert json.loads(json.dumps(want)) == res["calibration"]["metrics"]["mutual_knn"]


def test_cli_prints_the_calibrated_choice(store, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    out = CliRunner().invoke(app, ["layers", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text",
                                   "--k", "4", "--permutations", "40", "--store", store.loc.path()])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "calibrated mutual_knn (score - mean of 40 permuted-text scores" in text
    assert "family-wise p of the chosen pair" in text
    assert ("the chosen pair is the last-layer pair" in text or "not distinguishable from the last-layer pair" in text
            or "beyond the null's spread" in text)
