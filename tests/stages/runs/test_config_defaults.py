"""One default: a RunConfig from Python trains the device-sized preset the CLI trains (auto), and both say which;
run ids hash canonical knob values (lam=30 is lam=30.0); a knob added to TrainConfig cannot silently change the
ids of older runs (it must declare what its absence meant)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import field, make_dataclass

import pytest
from toy_store import toy_store

from stratalign.cli.values import trainer_overrides
from stratalign.core.objectives import STRUCTURE_GRID
from stratalign.stages.runs.config import RunConfig, resolve_run
from stratalign.stages.runs.training import train_run
from stratalign.train.config import TrainConfig, check_recorded_fields, knob


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return toy_store(tmp_path_factory.mktemp("defaults"))


def _cfg(**kw) -> RunConfig:
    return RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", **kw)


def test_python_trains_the_cli_preset_and_says_so(store, capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = resolve_run(store, _cfg())
    assert run.preset == "cpu" and (run.train["batch_size"], run.train["max_steps"]) == (256, 600)
    assert resolve_run(store, _cfg(preset=None)).train["batch_size"] == 4096  # asked for: TrainConfig's own
    res = train_run(store, _cfg(options=(("max_steps", 6), ("dim", 8))))
    assert not res.skipped
    assert capsys.readouterr().err.splitlines()[0] == (
        "preset cpu (no CUDA): batch 256, 6 steps (--set), warm-up 100, patience 40, eval every 10; --set dim=8")
    cli = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "train", "--dataset", "toy", "--vision",
                          "tiny-image", "--text", "tiny-text", "--layers", "last", "--set", "max_steps=6", "--set",
                          "dim=8", "--store", store.url], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f"run {res.run_id} (already in the store)")  # the same run: not trained again
    assert "preset cpu (no CUDA): batch 256, 6 steps (--set)" in cli.stderr


def test_knob_values_are_canonical_in_run_ids(store) -> None:
    grid_lam = STRUCTURE_GRID[0][1][-1]
    assert grid_lam == 30.0 and isinstance(grid_lam, float)
    given = trainer_overrides(["lam=30"])  # --set parses JSON: an int
    assert given == (("lam", 30),) and isinstance(given[0][1], int)
    by_set = resolve_run(store, _cfg(objective="clip+structure", options=(*given, ("warmup_steps", 5))))
    by_grid = resolve_run(store, _cfg(objective="clip+structure", options=(("lam", grid_lam), ("warmup_steps", 5))))
    assert by_set.run_id == by_grid.run_id and by_set.train["lam"] == 30.0
    assert isinstance(by_set.train["lam"], float) and TrainConfig(tau=1).tau == 1.0
    assert TrainConfig(max_steps=7).to_dict()["max_steps"] == 7  # integer settings stay integers


def test_a_knob_added_without_its_absent_value_fails() -> None:
    check_recorded_fields(TrainConfig)
    added = make_dataclass("Later", [("new_knob", int, field(default=1))], bases=(TrainConfig,))
    with pytest.raises(TypeError, match=r"fields \['new_knob'\] were added after runs were recorded"):
        check_recorded_fields(added)
    declared = make_dataclass("Later", [("new_knob", int, knob(1, absent=1))], bases=(TrainConfig,))
    check_recorded_fields(declared)
