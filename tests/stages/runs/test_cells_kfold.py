"""K-fold cells (docs/method.md § 3.8): a cell of a dataset with a very small val split chooses its step over one
selection run per seed and fold (each a content-addressed run), from the validation curves averaged over seeds and
folds, then refits every seed on all its training pairs to that step."""

from __future__ import annotations

import numpy as np
import pytest
from toy_store import FAST, toy_store
from typer.testing import CliRunner

from stratalign.errors import StratalignError
from stratalign.stages.runs.cells import choose_cells
from stratalign.stages.runs.config import RunConfig, resolve_run
from stratalign.stages.runs.data import split_run_tensors
from stratalign.store.runs import RunRegistry

FOLDS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return toy_store(tmp_path_factory.mktemp("kfold"))


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{**dict(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST,
                               folds=FOLDS), **kw})


def _rows(registry: RunRegistry, rid: str) -> set[int]:
    return set(split_run_tensors(registry.load(rid)[1])[1].caption_rows.tolist())


@pytest.fixture(scope="module")
def chosen(store):
    """One clip cell (validation auto: the toy's 8 val pairs are too few), 2 seeds x 3 folds, chosen and refitted."""
    assert len(store.dataset("toy").pairs("val")[0]) < 100
    choices, finals = choose_cells(store, [_cfg(seed=0), _cfg(seed=1)], tune=False)
    return choices[0], finals


def test_selection_runs_are_one_per_seed_and_fold_and_the_step_is_the_argmax_of_their_mean(store, chosen) -> None:
    choice, _ = chosen
    registry = RunRegistry(store)
    (point,) = choice.points
    assert choice.folds == FOLDS and len(point.runs) == 2 * FOLDS
    configs = [registry.config(rid) for rid in point.runs]
    assert [(c["seed"], c["fold"], c["folds"], c["validation"]) for c in configs] == [
        (s, f, FOLDS, "kfold") for s in (0, 1) for f in range(FOLDS)]
    # by hand: every run's validation rsum at the steps all of them evaluated, averaged, its argmax
    curves = [{r["step"]: r["rsum"] for r in registry.metrics(rid)["val_curve"]} for rid in point.runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    mean = np.mean([[c[s] for s in steps] for c in curves], axis=0)
    assert choice.step == steps[int(np.argmax(mean))] and choice.value == pytest.approx(mean.max())
    # the evidence: per fold, its seeds' mean curve; their mean is the cell's curve
    record = choice.record()
    per_fold = record["grid"][0]["per_fold"]
    assert [p["fold"] for p in per_fold] == list(range(FOLDS)) and record["folds"] == FOLDS
    assert np.allclose(np.mean([[v for _, v in p["curve"]] for p in per_fold], axis=0), mean)


def test_folds_of_a_seed_hold_out_disjoint_parts_covering_its_pairs_and_the_refit_trains_on_all(store, chosen) -> None:
    choice, finals = chosen
    registry = RunRegistry(store)
    (point,) = choice.points
    pool = set(store.dataset("toy").pairs("train")[1].tolist())
    for seed, final in zip((0, 1), finals):
        fold_runs = [rid for rid, c in zip(point.runs, [registry.config(r) for r in point.runs]) if c["seed"] == seed]
        trained = [_rows(registry, rid) for rid in fold_runs]
        everything = set().union(*trained)
        held = [everything - t for t in trained]
        assert sum(len(h) for h in held) == len(everything) and set().union(*held) == everything
        cfg, met = registry.config(final), registry.metrics(final)
        assert cfg["validation"] == "refit" and cfg["folds"] == FOLDS and "fold" not in cfg
        assert _rows(registry, final) == everything and cfg["n_train"] == len(everything)
        assert cfg["train"]["stop_step"] == choice.step and met["best_step"] == choice.step
    assert everything == pool  # n_pairs all: the folds cover the whole train split


def test_kfold_runs_are_reused_and_a_bare_refit_is_refused(store, chosen) -> None:
    choice, finals = chosen
    again, finals2 = choose_cells(store, [_cfg(seed=0), _cfg(seed=1)], tune=False)
    assert again[0].trained == 0 and finals2 == finals and again[0].points[0].runs == choice.points[0].runs
    with pytest.raises(StratalignError, match="refit on every training pair, and it needs the step chosen over the 3"):
        resolve_run(store, _cfg(validation="kfold"))
    with pytest.raises(StratalignError, match="fold=1 names a fold of k-fold"):
        resolve_run(store, _cfg(validation="split", fold=1))


def test_every_objective_goes_through_the_same_folds_and_zero_weight_matches_clip(store, chosen) -> None:
    """The control invariant through k-fold: STRUCTURE at lam=0 trains on the same folds as CLIP, with the same
    curves, so its cell chooses the same step and its refit restores it."""
    choice, _ = chosen
    (zero,), _ = choose_cells(store, [_cfg(seed=0, objective="clip+structure", options=FAST + (("lam", 0.0),)),
                                      _cfg(seed=1, objective="clip+structure", options=FAST + (("lam", 0.0),))],
                              tune=False)
    registry = RunRegistry(store)
    for a, b in zip(choice.points[0].runs, zero.points[0].runs):
        assert _rows(registry, a) == _rows(registry, b)
        assert registry.metrics(a)["val_curve"] == registry.metrics(b)["val_curve"]
    assert zero.step == choice.step and zero.value == choice.value


def test_a_lone_run_keeps_its_ids(store) -> None:
    """auto of one run is still the val split (ids unchanged); only a cell's auto becomes k-fold."""
    assert resolve_run(store, _cfg()).run_id == resolve_run(store, _cfg(validation="split")).run_id
    assert "folds" not in resolve_run(store, _cfg(folds=4)).identity()


def test_cli_train_and_sweep_take_validation_kfold_and_folds(store, chosen, tmp_path) -> None:
    from stratalign.cli.main import app

    common = ["--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--store", store.url,
              *[a for k, v in FAST for a in ("--set", f"{k}={v}")]]
    out = CliRunner().invoke(app, ["train", *common, "--layers", "last", "--validation", "kfold", "--folds", "2"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "chosen over 2 folds: step" in text and "the refit on all" in text
    out = CliRunner().invoke(app, ["sweep", *common, "--layers", "last", "--objective", "clip", "--seed", "0",
                                   "--validation", "kfold", "--folds", "2", "--out", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    assert "0 run(s) trained, 3 already in the store" in out.output  # the train call's runs, reused
    assert "(mean of 1 seeds x 2 folds, then a refit on all pairs)" in (tmp_path / "rep" / "report.md").read_text()
    bad = CliRunner().invoke(app, ["train", *common, "--validation", "kfold", "--folds", "1"])
    assert bad.exit_code == 2 and "at least 2 folds" in bad.output


def test_a_kfold_sweep_plots_the_fold_runs_mean_curve_for_a_refit(store, chosen) -> None:
    """The sweep's validation curves of a refit are its seed's fold runs' mean (its own curve is measured on pairs it
    trained on); the cell's runs are the ones chosen above, reused."""
    from stratalign.stages.runs.sweep import SweepConfig, run_sweep

    choice, finals = chosen
    res = run_sweep(store, SweepConfig(base=_cfg(), seeds=(0, 1), objectives=("clip",), layer_rules=("last",)),
                    progress=False)
    assert res.trained == 0 and res.run_ids == list(finals) and res.tuning["folds"].to_list() == [FOLDS]
    registry = RunRegistry(store)
    for j, final in enumerate(finals):
        folds = choice.points[0].runs[j * FOLDS:(j + 1) * FOLDS]
        curves = [{r["step"]: r["rsum"] for r in registry.metrics(rid)["val_curve"]} for rid in folds]
        rows = res.val_curves.filter(res.val_curves["run"] == final)
        assert rows.height and rows["step"].to_list() == sorted(set.intersection(*(set(c) for c in curves)))
        for step, rsum in zip(rows["step"], rows["rsum"]):
            assert rsum == pytest.approx(np.mean([c[step] for c in curves]))
