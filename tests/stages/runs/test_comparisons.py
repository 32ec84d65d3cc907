"""Per-query results of runs (queries.safetensors), recomputed from the weights for runs that lack them, the
comparisons a sweep writes from them, and evaluation results that name their dataset version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fake_encoders import load_tiny

from stratalign.core.scoring import recall_of
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.runs import evaluate as ev
from stratalign.stages.runs.training import RunConfig, train_run
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import QUERIES_FILE, RunRegistry

FAST = (("max_steps", 30), ("patience", 10), ("eval_every", 5), ("warmup_steps", 10), ("dim", 8))


def _ingest(table: Path, name: str, seed: int = 0):
    return ingest_source("table", name, table=str(table), image_col="image", caption_col="caption",
                         label_col="label", seed=seed)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import caption_for, make_images

    root = tmp_path_factory.mktemp("queries")
    make_images(root / "imgs", 60)
    lines = ["image,caption,label"] + [f"imgs/img{i:03d}.png,{caption_for(i)},c{i % 3}" for i in range(60)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    fs = FeatureStore.open(str(root / "store"), "a", create=True)
    for name in ("toy", "other"):
        fs.save_dataset(_ingest(root / "pairs.csv", name))
        extract(fs, name, ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
                load=load_tiny)
    return fs


def _table_of(fs: FeatureStore) -> Path:
    return Path(fs.url.removeprefix("file://")).parent / "pairs.csv"


def _run(fs: FeatureStore, objective: str = "clip", seed: int = 0) -> str:
    head = "csa" if objective == "csa" else "linear"
    cfg = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", objective=objective,
                    head=head, seed=seed, options=FAST)
    return train_run(fs, cfg)["run_id"]


def test_queries_recomputed_from_weights_match_the_run_metrics(store, monkeypatch) -> None:
    rid = _run(store)
    registry = RunRegistry(store)
    assert registry.load_queries(rid) is not None  # kept by train_run
    registry.loc.remove("runs", rid, QUERIES_FILE)  # as a run trained before per-query results existed
    queries, meta = ev.run_queries(store, rid)
    metrics = registry.metrics(rid)
    hits = {k: v for k, v in queries.items() if "_R@" in k}
    assert recall_of(hits) == pytest.approx({k: metrics[k] for k in hits}, abs=1e-9)
    assert 100 * queries["zs_top1"].mean() == pytest.approx(metrics["zs_top1"], abs=1e-9)
    ds = store.dataset("toy")
    assert set(ds.images["split"].to_numpy()[queries["image_rows"]]) == {"test"}
    assert len(queries["caption_rows"]) == len(queries["t2i_R@1"]) and queries["i2t_R@1"].dtype == bool
    counts = np.bincount(queries["zs_true"])
    assert float(meta["zs_majority"]) == pytest.approx(100 * counts.max() / counts.sum())
    assert meta["dataset_fingerprint"] == ds.fingerprint
    from stratalign.store.verify import verify_store

    assert [f.status for f in verify_store(store).findings if f.target == rid] == ["ok"]
    monkeypatch.setattr(ev, "_rescore", lambda *a, **k: pytest.fail("recomputed although stored"))
    again, _ = ev.run_queries(store, rid)
    assert all(np.array_equal(again[k], queries[k]) for k in queries)


def test_sweep_writes_paired_comparisons(store, tmp_path: Path) -> None:
    from stratalign.report.compare import KEY_METRICS
    from stratalign.stages.runs.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(base=RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", options=FAST),
                      seeds=(0, 1), objectives=("clip", "csa"), layer_rules=("last",))
    res = run_sweep(store, cfg, str(tmp_path), progress=False)
    table = pl.read_csv(tmp_path / "comparisons.csv")
    # csa / last against clip / last, on every verdict metric (the same-layers comparison is this one here)
    assert set(table["comparison"]) == {"vs_last"} and table.height == len(KEY_METRICS)
    assert set(table["method"]) == {"csa / last"} and set(table["baseline"]) == {"clip"}
    assert set(table["seeds"]) == {2} and (table["low"] <= table["diff"]).all() and (table["diff"] <= table["high"]).all()
    i2t = table.filter(pl.col("metric") == "i2t_R@1").row(0, named=True)
    board = res.runs.group_by("objective").agg(pl.col("i2t_R@1").mean())
    means = dict(zip(board["objective"], board["i2t_R@1"]))
    assert i2t["diff"] == pytest.approx(means["csa"] - means["clip"], abs=1e-6)
    assert res.leaderboard["zs_majority"].n_unique() == 1


def test_cross_dataset_eval_names_its_version_and_is_recomputed_after_a_resplit(store) -> None:
    rid = _run(store, seed=3)
    registry = RunRegistry(store)
    first = ev.evaluate_saved_run(store, rid, "other")
    fp = store.dataset("other").fingerprint
    assert first["eval_dataset_fingerprint"] == fp and first["previous_eval"] == "absent"
    assert Path(first["eval_file"]).is_file() and first["eval_file"] == registry.eval_path(rid, "other")
    assert registry.stored_eval(rid, "other", fp)[1] == "current"
    store.save_dataset(_ingest(_table_of(store), "other", seed=5), replace=True)  # a re-split
    new_fp = store.dataset("other").fingerprint
    assert new_fp != fp and registry.stored_eval(rid, "other", new_fp) == (None, "stale")
    again = ev.evaluate_saved_run(store, rid, "other")
    assert again["previous_eval"] == "stale" and again["eval_dataset_fingerprint"] == new_fp
    assert registry.stored_eval(rid, "other", new_fp)[1] == "current"
