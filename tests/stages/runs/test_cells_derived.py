"""A cell's final runs from the weights its selection runs kept at the chosen step (train.cohorts): the same runs as
training them again to that step, bit for bit in fp32, for one pass over the data instead of two."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from levels_store import FAST, levels_store

from stratalign.device import bf16_supported
from stratalign.stages.runs import cells as cells_mod
from stratalign.stages.runs.cells import choose_cells
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.sweep import cost_table
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

_TIMING = ("train_seconds", "train_loop_seconds", "train_share_seconds", "message", "derived_from")


@pytest.fixture(scope="module")
def blank(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("derived")
    levels_store(root, images=160)
    return root / "store"


def _copy(blank: Path, tmp_path: Path, name: str) -> FeatureStore:
    shutil.copytree(blank, tmp_path / name)
    return FeatureStore.open(str(tmp_path / name), "a")


def _cfgs(objectives: tuple[str, ...], precision: str = "fp32") -> list[RunConfig]:
    options = FAST + ((("precision", precision),) if precision != "fp32" else ())
    return [RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=options,
                      validation="split", objective=obj, seed=seed) for obj in objectives for seed in range(3)]


def test_derived_finals_equal_finals_trained_again(blank, tmp_path, monkeypatch) -> None:
    """With every knob tuned, each cell's final runs are its chosen point's selection runs at the chosen step: the same
    run ids, weights byte for byte and every metric as when they train again (the old way), only faster."""
    cfgs = _cfgs(("clip", "clip+structure"))
    derived = _copy(blank, tmp_path, "a")
    choices, ids = choose_cells(derived, cfgs, tune=True)
    monkeypatch.setattr(cells_mod, "save_derived_final", lambda *a, **k: None)  # every final trained again
    trained = _copy(blank, tmp_path, "b")
    _, again = choose_cells(trained, cfgs, tune=True)
    assert ids == again
    a, b = RunRegistry(derived), RunRegistry(trained)
    for choice in choices:
        point = next(p for p in choice.points if p.knobs == choice.knobs)
        for rid, selection in zip(choice.final, point.runs):
            ma, mb = a.metrics(rid), b.metrics(rid)
            assert ma["derived_from"] == selection and "derived_from" not in mb
            assert ma["best_step"] == choice.step and ma["stopped_reason"] == "fixed_step"
            assert a.weights_bytes(rid) == b.weights_bytes(rid)
            assert {k: v for k, v in ma.items() if k not in _TIMING} == {k: v for k, v in mb.items() if k not in _TIMING}
    # the bake-off's cost of a cell counts a derived final once: inside its selection run
    costs = cost_table(a, choices).to_dicts()
    for choice, row in zip(choices, costs):
        selection = [rid for p in choice.points for rid in p.runs]
        paid = sum(a.metrics(rid).get("train_share_seconds", a.metrics(rid)["train_seconds"]) for rid in selection)
        assert row["cell_seconds"] == pytest.approx(paid)


def test_a_cohort_split_across_calls_trains_its_finals(blank, tmp_path) -> None:
    """A seed whose selection run was already in the store did not train beside the others: the point's weights were
    not kept, so its finals train to the chosen step as before (and are the same runs)."""
    store = _copy(blank, tmp_path, "c")
    cfgs = _cfgs(("clip",))
    choose_cells(store, cfgs[:1], tune=True)  # seed 0's selection run (and its final) in the store
    choices, ids = choose_cells(store, cfgs, tune=True)
    reg = RunRegistry(store)
    assert all("derived_from" not in reg.metrics(rid) for rid in ids)
    assert all(reg.metrics(rid)["best_step"] == choices[0].step for rid in ids)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="needs bf16 on this CPU")
def test_bf16_final_is_the_trajectory_its_step_was_chosen_on(blank, tmp_path) -> None:
    """In bf16 a run's rounding depends on its stack, so a final trained again beside other runs leaves its selection
    run's trajectory; a derived final is the selection run at the chosen step: its validation curve is the selection
    run's up to that step, and its restored value the one the choice saw."""
    store = _copy(blank, tmp_path, "d")
    choices, _ = choose_cells(store, _cfgs(("clip+structure",), "bf16"), tune=True)
    reg = RunRegistry(store)
    for choice in choices:
        for rid in choice.final:
            met = reg.metrics(rid)
            source = reg.metrics(met["derived_from"])["val_curve"]
            assert met["val_curve"] == [row for row in source if row["step"] <= choice.step]
