"""Hyperparameter choice on validation (docs/method.md, "Hyperparameter choice"), for one run or many: the cells
of stages.runs.cells with the objective's grid tuned - every grid point's selection runs, the point and step with
the best validation value averaged over the cell's seeds (one seed: its own curve), the grid extended past an edge
the choice lands on, then the final run stopped at the chosen step. Never reads a test number. The final run
carries a tuning record (store.runs: the grid, each point's runs, mean curve and value). A knob given with --set
is not tuned; an objective without a grid only has its step chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stratalign.stages.runs.cells import CellChoice, choice_label, choose_cells, grid_points
from stratalign.stages.runs.config import RunConfig
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

__all__ = ["TunedRun", "grid_points", "tune_run", "tune_runs", "tuned_run"]


@dataclass(frozen=True)
class TunedRun:
    """The chosen run's metrics and the grid it was chosen from (None when the objective has no grid)."""

    metrics: dict[str, Any]
    tuning: dict[str, Any] | None
    trained: int = 0  # runs trained (the others were in the store already)
    tried: int = 1  # runs asked for (grid points)

    @property
    def run_id(self) -> str:
        return str(self.metrics["run_id"])

    def chosen_label(self) -> str:
        """e.g. 'lam=3, step 80' (empty without a choice)."""
        if not self.tuning:
            return ""
        return choice_label(self.tuning["chosen"], self.tuning.get("step"))


def tune_run(store: FeatureStore, cfg: RunConfig, *, metric: str | None = None, force: bool = False,
             progress: bool = False) -> TunedRun:
    """Choose the run's knobs (its objective's grid) and stopping step on validation `metric` (default: the run's
    --select, else rsum), train the final run and record the grid with it."""
    return tune_runs(store, [cfg], metric=metric, force=force, progress=progress)[0]


def tune_runs(store: FeatureStore, cfgs: list[RunConfig], *, metric: str | None = None, force: bool = False,
              progress: bool = False) -> list[TunedRun]:
    """`tune_run` of many configs at once: configs that differ only in their seed are one cell with one choice
    (stages.runs.cells); every run trains through batched `train_runs` calls. One TunedRun per config."""
    choices, finals = choose_cells(store, cfgs, tune=True, metric=metric, force=force, progress=progress)
    by_run = {rid: c for c in choices for rid in c.final}
    registry = RunRegistry(store)
    return [_tuned(registry, by_run[rid], rid) for rid in finals]


def tuned_run(store: FeatureStore, choice: CellChoice) -> TunedRun:
    """The TunedRun of a one-seed cell's choice (its final run)."""
    return _tuned(RunRegistry(store), choice, choice.final[0])


def _tuned(registry: RunRegistry, choice: CellChoice, run_id: str) -> TunedRun:
    tuning = choice.record() if (choice.points[0].knobs or choice.step is not None) else None
    return TunedRun({**registry.metrics(run_id), "run_id": run_id}, tuning, choice.trained, choice.tried)
