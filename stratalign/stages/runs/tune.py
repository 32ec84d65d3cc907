"""Hyperparameter choice on validation (METHOD.md 3.7): one run per value of the objective's grid, the best by
the validation selection metric.

Each grid point is an ordinary run in the store (content-addressed, so a point trained before is reused); the
choice reads only each run's validation value (the selected checkpoint's value of the selection metric; for a
closed-form fit, its one validation row), never a test number. The chosen run carries a tuning record
(store.runs: the grid, each point's run id and validation value) so reports say what was tried. A knob given
with --set is not tuned (the grid is cut to the points with that value). An objective without a grid trains
its one run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from stratalign.core.objectives import Objective, objective_named
from stratalign.errors import StratalignError
from stratalign.stages.runs.config import RunConfig, resolve_run
from stratalign.stages.runs.training import train_runs
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.train.validation import SELECT_METRICS, check_select

DEFAULT_TUNE_METRIC = "rsum"


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
        """e.g. 'lam=3' (empty without tuning)."""
        if not self.tuning:
            return ""
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.tuning["chosen"].items())


def grid_points(objective: Objective, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the objective's grid values, in grid order; a knob in `fixed` keeps its value."""
    names = [k for k, _ in objective.grid]
    values = [(fixed[k],) if k in fixed else tuple(v) for k, v in objective.grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def validation_value(metrics: dict[str, Any], metric: str) -> float:
    """A run's validation value of `metric` (rsum | zeroshot | clip_loss): at its selected checkpoint for a
    trained run, its one validation row for a closed-form fit."""
    key = SELECT_METRICS[metric][0]
    curve = metrics.get("val_curve") or []
    if not curve or not isinstance(curve[0], dict):
        raise StratalignError(f"run {metrics.get('run_id')} has no validation curve (trained before 2026-11-25): "
                              "train it again with --force to tune on it")
    step = (metrics.get("selection") or {}).get("step", curve[-1]["step"])
    row = next((r for r in curve if r["step"] == step), curve[-1])
    value = row.get(key)
    if value is None:
        raise StratalignError(f"run {metrics.get('run_id')} has no validation {metric} (a dataset without labels "
                              "has no zero-shot): tune on rsum or clip_loss")
    return float(value)


@dataclass(frozen=True)
class _Plan:
    """One tuned cell: the metric, the grid points and their resolved runs (one point without a grid)."""

    metric: str
    fixed: dict[str, Any]
    points: list[dict[str, Any]] | None
    cells: list[RunConfig]
    resolved: list[Any]


def _plan(store: FeatureStore, cfg: RunConfig, metric: str | None) -> _Plan:
    objective = objective_named(cfg.objective)
    metric = metric or cfg.select or dict(cfg.options).get("select") or DEFAULT_TUNE_METRIC
    check_select(metric)  # an unknown metric fails here, in one line
    if not objective.grid:
        return _Plan(metric, {}, None, [cfg], [resolve_run(store, cfg)])
    fixed = {k: v for k, v in cfg.options if k in dict(objective.grid)}
    points = grid_points(objective, fixed)
    cells = [replace(cfg, options=tuple((k, v) for k, v in cfg.options if k not in point) + tuple(point.items()))
             for point in points]
    return _Plan(metric, fixed, points, cells, [resolve_run(store, cell) for cell in cells])


def tune_run(store: FeatureStore, cfg: RunConfig, *, metric: str | None = None, force: bool = False,
             progress: bool = False) -> TunedRun:
    """Train every grid point of the run's objective (reusing the ones in the store), choose the best by
    validation `metric` (default: the run's --select, else rsum), record the grid with the chosen run."""
    return tune_runs(store, [cfg], metric=metric, force=force, progress=progress)[0]


def tune_runs(store: FeatureStore, cfgs: list[RunConfig], *, metric: str | None = None, force: bool = False,
              progress: bool = False) -> list[TunedRun]:
    """`tune_run` of many cells: every grid point of every cell is resolved first (a bad setting fails before any
    training), all points train in one `train_runs` call (batched), then each cell chooses its point."""
    plans = [_plan(store, cfg, metric) for cfg in cfgs]
    cells = [c for p in plans for c in p.cells]
    results = iter(train_runs(store, cells, resolved=[r for p in plans for r in p.resolved], force=force,
                              progress=progress))
    registry = RunRegistry(store)
    out = []
    for plan in plans:
        got = [next(results) for _ in plan.cells]
        if plan.points is None:
            out.append(TunedRun(got[0], None, int(not got[0].get("skipped")), 1))
            continue
        out.append(_choose(registry, plan, got))
    return out


def _choose(registry: RunRegistry, plan: _Plan, results: list[dict[str, Any]]) -> TunedRun:
    """The best grid point by validation value (strictly better only: on a tie the earlier point stays),
    recorded with the chosen run."""
    key, higher = SELECT_METRICS[plan.metric]
    tried = [{"knobs": point, "run_id": res["run_id"], "value": validation_value(res, plan.metric)}
             for point, res in zip(plan.points or [], results)]
    best = tried[0]
    for t in tried[1:]:
        if (t["value"] > best["value"]) if higher else (t["value"] < best["value"]):
            best = t
    tuning = {"metric": plan.metric, "key": key, "split": "validation", "fixed": plan.fixed, "chosen": best["knobs"],
              "chosen_run": best["run_id"], "grid": tried}
    registry.save_tuning(best["run_id"], tuning)
    trained = sum(not r.get("skipped") for r in results)
    return TunedRun({**registry.metrics(best["run_id"]), "run_id": best["run_id"]}, tuning, trained, len(tried))
