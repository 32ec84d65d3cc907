"""Typed results: train_run / train_runs give RunResult, evaluate_saved_run EvalResult; both read as the dicts
they replaced (result["run_id"], result.get(...), {**result}). A metric declared in the registry (with its
function in core.scoring) is computed and recorded by every run: adding a metric touches those two files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_store import FAST, toy_store

from stratalign.core import metric_registry, scoring
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.evaluate import evaluate_saved_run
from stratalign.stages.runs.results import EvalResult, RunResult
from stratalign.stages.runs.training import train_run, train_runs
from stratalign.store.runs import RunRegistry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return toy_store(tmp_path_factory.mktemp("results"))


def _cfg(**kw) -> RunConfig:
    return RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST, **kw)


def test_results_are_typed_and_read_as_the_old_dicts(store) -> None:
    res = train_run(store, _cfg(seed=4))
    assert isinstance(res, RunResult) and not res.skipped and res.run_id.startswith("clip-linear-")
    assert res["run_id"] == res.run_id and res["skipped"] is False and res.get("missing", 7) == 7
    assert res["i2t_R@1"] == res.metrics["i2t_R@1"] and "zs_top1" in res
    saved = RunRegistry(store).metrics(res.run_id)
    assert dict(res) == {"run_id": res.run_id, "skipped": False, **saved} == res  # == the dict it replaced
    assert json.loads(json.dumps(res.as_dict())) == {**res}
    again = train_runs(store, [_cfg(seed=4), _cfg(seed=4)])
    assert [r.skipped for r in again] == [True, True] and again[0].run_id == res.run_id
    ev = evaluate_saved_run(store, res.run_id)
    assert isinstance(ev, EvalResult) and ev.run_id == res.run_id and ev.dataset == "toy"
    assert ev.fingerprint == store.dataset("toy").fingerprint == ev["eval_dataset_fingerprint"]
    assert ev["i2t_R@1"] == pytest.approx(res["i2t_R@1"]) and "skipped" not in ev


def test_a_metric_added_to_the_registry_is_recorded(store, monkeypatch) -> None:
    def mean_cosine(space: scoring.Space) -> float:  # what a new function of core/scoring.py would be
        a = space.z_img[space.txt_to_img]
        return float(100 * np.mean(np.sum(a * space.z_txt, 1) / np.linalg.norm(a, axis=1)
                                   / np.linalg.norm(space.z_txt, axis=1)))

    monkeypatch.setattr(scoring, "mean_pair_cosine", mean_cosine, raising=False)
    entry = metric_registry.Metric("pair_cosine", "mean cosine of the test pairs", space_score="mean_pair_cosine")
    monkeypatch.setattr(metric_registry, "REGISTRY", (*metric_registry.REGISTRY, entry))
    res = train_run(store, _cfg(seed=5))
    assert -100 <= res["pair_cosine"] <= 100
    assert RunRegistry(store).metrics(res.run_id)["pair_cosine"] == res["pair_cosine"]
