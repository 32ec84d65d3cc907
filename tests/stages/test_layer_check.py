"""The layer check (issue 28 Deliver 2): candidate pairs spread over the calibrated ranking, a CLIP run each, and
the rank correlation of their scores with the validation rsum, on a toy table encoded by the tiny encoders."""

from __future__ import annotations

import numpy as np
import pytest
from levels_store import FAST, levels_store

from stratalign.core.stats import spearman
from stratalign.errors import StratalignError
from stratalign.stages.layer_check import candidate_pairs, check_candidates
from stratalign.stages.layers import LayersConfig, run_layers
from stratalign.stages.runs.config import RunConfig
from stratalign.store.runs import RunRegistry


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("layer_check")
    fs = levels_store(root)
    cfg = LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("mutual_knn",), k=5,
                       permutations=20)
    return fs, run_layers(fs, cfg, "best", "mutual_knn").result


def test_candidates_spread_over_the_calibrated_ranking_with_the_last_pair(layered) -> None:
    _, result = layered
    cal = np.asarray(result["calibration"]["metrics"]["mutual_knn"]["calibrated"])
    order = [divmod(int(i), cal.shape[1]) for i in np.argsort(-cal, axis=None, kind="stable")]
    pairs = candidate_pairs(result, "mutual_knn", 3)
    assert pairs[:3] == [order[0], order[2], order[5]]  # ranks 0, 2.5 (rounded to even), 5 of the 6 pairs
    assert pairs[0] == order[0] and (cal.shape[0] - 1, cal.shape[1] - 1) in pairs
    assert len(candidate_pairs(result, "mutual_knn", 100)) == cal.size  # never more than there are pairs
    top = candidate_pairs(result, "mutual_knn", 2, span=3)  # spread over the top 3 ranks only
    assert top[:2] == [order[0], order[2]]
    with pytest.raises(StratalignError, match="at least 2"):
        candidate_pairs(result, "mutual_knn", 1)


def test_check_trains_each_candidate_and_correlates_scores_with_validation_rsum(layered) -> None:
    fs, result = layered
    base = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", options=FAST)
    check = check_candidates(fs, result, base, count=4, seeds=(0, 1))
    registry = RunRegistry(fs)
    assert len(check.rows) >= 4 and check.seeds == (0, 1)
    for row in check.rows:
        assert len(row["runs"]) == 2
        for rid in row["runs"]:  # a CLIP run on exactly that layer pair, with all training pairs
            cfg = registry.config(rid)
            assert (cfg["vision_layer"], cfg["text_layer"], cfg["objective"]) == (
                row["vision_layer"], row["text_layer"], "clip")
        raw = np.asarray(result["matrices"]["mutual_knn"])[row["vision_layer"], row["text_layer"]]
        assert row["raw"] == pytest.approx(raw)
    val = [r["val_rsum"] for r in check.rows]
    assert check.rho_calibrated == pytest.approx(spearman([r["calibrated"] for r in check.rows], val)[0])
    assert check.rho_raw == pytest.approx(spearman([r["raw"] for r in check.rows], val)[0])
    lines = check.lines()
    assert "Spearman rho" in lines[0] and len(lines) == 1 + len(check.rows)
    again = check_candidates(fs, result, base, count=4, seeds=(0, 1))  # the runs are reused from the store
    assert again == check
