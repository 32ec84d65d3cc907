"""Model selection and tuning through the store (docs/method.md § 3.8-3.9): every run records how its checkpoint was chosen
and its validation curve; `tune_run` picks a grid point by validation only and keeps the grid with the run.

The store holds a small labelled table encoded by the tiny deterministic encoders of fake_encoders.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from levels_store import FAST, levels_store

from stratalign.core.objectives import objective_named
from stratalign.errors import StratalignError
from stratalign.stages.runs.sweep import SweepConfig, run_sweep
from stratalign.stages.runs.training import RunConfig, resolve_run, train_run
from stratalign.stages.runs.tune import grid_points, tune_run, tune_runs
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    root = tmp_path_factory.mktemp("tune")
    fs = levels_store(root)
    return fs


def _cfg(**kw) -> RunConfig:
    # the val split (a lone run's auto): its few pairs would make every cell a k-fold one (test_cells_kfold)
    return RunConfig(**{**dict(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST,
                               validation="split"), **kw})


@pytest.mark.parametrize("objective,head,metric", [("clip", "linear", "rsum"), ("clip+ib", "linear", "rsum"),
                                                   ("comm", "linear", "comm_loss"), ("csa", "csa", "closed_form")])
def test_every_run_records_selection_and_validation_curve(store, objective, head, metric) -> None:
    """metrics.json names the selection metric and restored step, and holds a curve row per evaluation step with
    rsum, zero-shot top-1 (the table is labelled) and the CLIP loss; CoMM records its own loss."""
    res = train_run(store, _cfg(objective=objective, head=head, n_pairs=40))
    met = RunRegistry(store).metrics(res["run_id"])
    sel, curve = met["selection"], met["val_curve"]
    assert sel["metric"] == metric and sel["step"] == met["best_step"]
    steps = [row["step"] for row in curve]
    if metric == "closed_form":
        assert steps == [0] and {"rsum", "zs_top1", "clip_loss"} <= set(curve[0])
        return
    assert steps == list(range(0, 31, 5))
    assert all("lambda" in row for row in curve)
    if metric == "comm_loss":
        assert all(set(row) == {"step", "comm_loss", "lambda"} for row in curve)
        assert sel["value"] == min(row["comm_loss"] for row in curve)
    else:
        assert all({"rsum", "zs_top1", "clip_loss"} <= set(row) for row in curve)
        assert sel["value"] == max(row["rsum"] for row in curve)
        assert next(r for r in curve if r["step"] == sel["step"])["rsum"] == sel["value"]


def test_select_zeroshot_and_clip_loss_choose_by_their_metric(store) -> None:
    """The same training (same curve) restores different checkpoints by the metric asked for."""
    by = {s: RunRegistry(store).metrics(train_run(store, _cfg(n_pairs=40, seed=3, select=s))["run_id"])
          for s in ("rsum", "zeroshot", "clip_loss")}
    assert by["rsum"]["val_curve"] == by["zeroshot"]["val_curve"] == by["clip_loss"]["val_curve"]
    curve = by["rsum"]["val_curve"]
    for select, key, pick in (("zeroshot", "zs_top1", max), ("clip_loss", "clip_loss", min), ("rsum", "rsum", max)):
        best = pick(row[key] for row in curve)
        assert by[select]["selection"]["step"] == next(r["step"] for r in curve if r[key] == best), select
    # runs that differ only in the selection metric are different runs (the restored weights may differ)
    assert len({m["run_id"] for m in by.values()}) == 3
    with pytest.raises(StratalignError, match="select must be one of"):
        resolve_run(store, _cfg(select="accuracy"))
    # CoMM and CSA have their own rule: a sweep's --select leaves them alone
    assert "select" not in resolve_run(store, _cfg(objective="comm", select="zeroshot")).train


def test_tune_picks_the_best_validation_point_and_keeps_the_grid(store) -> None:
    """One seed: each point's value is the best of its run's validation curve; the best point and its step are
    chosen; the final run trains with that knob and stops at that step; the grid (extended past an edge the
    choice sat on) is kept with it."""
    cfg = _cfg(objective="clip+structure", n_pairs=40, seed=1)
    tuned = tune_run(store, cfg)
    registry = RunRegistry(store)
    grid = tuned.tuning["grid"]
    assert [p["knobs"] for p in grid[:4]] == grid_points(objective_named("clip+structure"), {})
    extended = [p["knobs"]["lam"] for p in grid[4:]]
    assert all(v not in (1.0, 3.0, 10.0, 30.0) for v in extended)  # only points past an edge were added
    for p in grid:
        curve = registry.metrics(p["run_id"])["val_curve"]
        assert p["value"] == max(row["rsum"] for row in curve)
        assert p["best_step"] == next(r["step"] for r in curve if r["rsum"] == p["value"])
    best = grid[int(np.argmax([p["value"] for p in grid]))]  # argmax: the earliest grid point on a tie
    assert tuned.tuning["chosen"] == best["knobs"] and tuned.tuning["step"] == best["best_step"]
    final = registry.config(tuned.run_id)["train"]
    assert final["lam"] == best["knobs"]["lam"] and final["stop_step"] == best["best_step"]
    assert tuned.metrics["best_step"] == best["best_step"] and tuned.run_id not in [p["run_id"] for p in grid]
    # the final run is its selection run stopped at the chosen step: the same validation numbers there
    sel = next(r for r in registry.metrics(best["run_id"])["val_curve"] if r["step"] == best["best_step"])
    fin = next(r for r in tuned.metrics["val_curve"] if r["step"] == best["best_step"])
    assert fin.keys() == sel.keys() and all(fin[k] == pytest.approx(sel[k], rel=1e-6) for k in fin)
    assert registry.tunings(tuned.run_id) == [tuned.tuning]
    again = tune_run(store, cfg)  # every run in the store: nothing trained, the same choice
    assert again.trained == 0 and again.run_id == tuned.run_id
    # a knob given with --set is not tuned
    fixed = tune_run(store, replace(cfg, options=FAST + (("lam", 3.0),)))
    assert [p["knobs"] for p in fixed.tuning["grid"]] == [{"lam": 3.0}]


def test_one_choice_per_cell_applies_to_every_seed(store) -> None:
    """Two seeds form one cell: the step (and knob) maximise the validation curve averaged over both seeds, and
    both final runs stop there."""
    cfgs = [_cfg(objective="clip+ib", n_pairs=40, seed=s) for s in (4, 5)]
    tuned = tune_runs(store, cfgs)
    registry = RunRegistry(store)
    assert tuned[0].tuning == tuned[1].tuning and tuned[0].run_id != tuned[1].run_id
    record = tuned[0].tuning
    for p in record["grid"]:
        curves = [{r["step"]: r["rsum"] for r in registry.metrics(rid)["val_curve"]} for rid in p["run_ids"]]
        steps = sorted(set(curves[0]) & set(curves[1]))
        mean = [(curves[0][s] + curves[1][s]) / 2 for s in steps]
        assert p["curve"] == [[s, m] for s, m in zip(steps, mean)] and p["value"] == max(mean)
    best = max(record["grid"], key=lambda p: p["value"])
    assert record["chosen"] == best["knobs"] and record["step"] == best["best_step"]
    for t in tuned:
        assert registry.config(t.run_id)["train"]["stop_step"] == record["step"]
        assert t.metrics["best_step"] == record["step"]


def test_a_choice_on_the_grid_edge_extends_the_grid() -> None:
    """docs/method.md § 3.9: the best value on the grid's top edge adds the next point up (x3 for a weight), until the choice
    is inside or a bound is hit; each extension is recorded."""
    from stratalign.stages.runs.cells import PointResult, _Cell, _extensions

    obj = objective_named("clip+structure")
    cell = _Cell(_cfg(objective="clip+structure"), [0], obj, "rsum", FAST, {}, grid_points(obj, {}))
    for i, p in enumerate(cell.points):
        cell.results[i] = PointResult(p, (f"r{i}",), (10,), (float(i),), 10, float(i))
    assert _extensions(cell) == [{"lam": 90.0}] and cell.extended == {"lam": [90.0]}
    cell.points.append({"lam": 90.0})
    cell.results[4] = PointResult({"lam": 90.0}, ("r4",), (10,), (2.0,), 10, 2.0)  # worse: inside now
    assert _extensions(cell) == []


def test_tuned_sweep_writes_the_grid_and_validation_curves(store, tmp_path: Path) -> None:
    cfg = SweepConfig(base=_cfg(), n_pairs=(40,), seeds=(0, 1), objectives=("clip", "clip+ib"),
                      layer_rules=("last",), tune=True)
    res = run_sweep(store, cfg, str(tmp_path / "out"), progress=False)
    tuning = pl.read_csv(tmp_path / "out" / "tuning.csv")
    # one row per cell and point: clip's one point, clip+ib's grid (and any extension); one chosen per cell
    assert tuning.filter(pl.col("objective") == "clip").height == 1 and tuning["chosen"].sum() == 2
    assert tuning.filter(pl.col("objective") == "clip+ib").height >= 4 and set(tuning["seeds"]) == {2}
    assert len(res.run_ids) == 4 and all("step" in label for label in res.runs["tuned"].to_list())
    assert (tmp_path / "out" / "validation_curves.png").stat().st_size > 0
    assert set(res.val_curves["method"]) == {"clip / last", "clip+ib / last"}


def test_cli_select_and_tune(store) -> None:
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args, "--store", store.url],
                              capture_output=True, text=True, timeout=300)

    base = ["train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
            "--n-pairs", "40", *[x for k, v in FAST for x in ("--set", f"{k}={v}")]]
    bad = cli(*base, "--select", "accuracy")
    assert bad.returncode == 2 and "expected one of rsum, zeroshot, clip_loss" in bad.stderr
    out = cli(*base, "--objective", "clip+ib", "--tune", "--seed", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("val rsum") >= 4 and "chosen on validation: beta=" in out.stdout
    assert out.stdout.count("* beta=") == 1 and ", step " in out.stdout


def test_cli_select_choices_are_the_trainer_metrics() -> None:
    """The CLI spells the metric names out (a light --help); they must be the trainer's."""
    from stratalign.cli.values import SELECT_CHOICES
    from stratalign.train.validation import SELECT_METRICS

    assert SELECT_CHOICES == tuple(SELECT_METRICS)


def test_comm_on_one_class_records_why_it_has_no_probe(store, tmp_path: Path) -> None:
    """A CoMM run whose training pairs hold one class cannot be probed: the run is saved and says why (a sweep
    goes on) instead of failing after training."""
    ds = store.dataset("toy")
    pool_images, pool_captions = ds.pairs("train")
    labels = ds.images["label"].to_numpy()[pool_images]
    ids = np.asarray(ds.captions["caption_id"].to_list(), dtype=object)[pool_captions][labels == "dark"]
    (tmp_path / "ids.txt").write_text("\n".join(ids[:12]) + "\n")
    res = train_run(store, _cfg(objective="comm", n_pairs=None, ids_file=str(tmp_path / "ids.txt")))
    met = RunRegistry(store).metrics(res["run_id"])
    assert "one class (dark)" in met["probe_skipped"] and "probe_acc" not in met


def test_verify_reads_tuning_records(store) -> None:
    """verify counts the tuning grids kept beside a run and reports a damaged one with the fix."""
    from stratalign.store.verify import verify_runs

    tuned = tune_run(store, _cfg(objective="clip+ib", n_pairs=40, seed=6))
    finding = next(f for f in verify_runs(store) if f.target == tuned.run_id)
    assert finding.status == "ok" and "1 tuning grid" in finding.message
    name = next(n for n in store.loc.listdir("runs", tuned.run_id) if n.startswith("tuning-"))
    path = Path(store.loc.path("runs", tuned.run_id, name))
    saved = path.read_bytes()
    try:
        path.write_text("[1, 2]")
        finding = next(f for f in verify_runs(store) if f.target == tuned.run_id)
        assert finding.status == "broken" and "not a tuning record; delete it" in finding.message
    finally:
        path.write_bytes(saved)


def test_sweep_skip_n_leaves_out_one_objective_at_one_size() -> None:
    cfg = SweepConfig(base=_cfg(), n_pairs=(20, None), seeds=(0,), objectives=("clip", "comm"),
                      layer_rules=("last", "auto"), skip_n=(("comm", 20),))
    cells = {(c.layers, c.objective, c.n_pairs) for c in cfg.cells()}
    assert ("last", "comm", 20) not in cells and ("auto", "comm", 20) not in cells
    assert {("last", "comm", None), ("auto", "comm", None), ("last", "clip", 20)} <= cells and len(cells) == 6


def test_zero_weight_cells_choose_and_score_exactly_as_clip(store) -> None:
    """docs/method.md § 3.8 at the level users see: a regularised objective at weight 0 goes through the same cell
    choice as CLIP and ends with the same stopping step and the same test numbers, seed by seed."""
    from stratalign.core.objectives import REGISTRY, Training
    from stratalign.stages.runs.cells import choose_cells

    regularised = [o for o in REGISTRY if o.training is Training.GRADIENT and o.regulariser is not None]
    cfgs = [_cfg(n_pairs=40, seed=s) for s in (7, 8)]
    for o in regularised:
        cfgs += [_cfg(objective=o.name, n_pairs=40, seed=s, options=FAST + ((o.weight_knob, 0.0), ("knn_k", 4),
                                                                            ("unpaired_from", "pool")))
                 for s in (7, 8)]
    choices, finals = choose_cells(store, cfgs, tune=False)
    registry = RunRegistry(store)
    clip = choices[0]
    assert clip.cell.objective == "clip" and len(choices) == 1 + len(regularised)
    for choice in choices[1:]:
        assert choice.step == clip.step and choice.value == clip.value, choice.cell.objective
        for rid, base in zip(choice.final, clip.final):
            got, want = registry.metrics(rid), registry.metrics(base)
            for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10", "zs_top1", "best_step"):
                assert got[key] == want[key], (choice.cell.objective, key)
