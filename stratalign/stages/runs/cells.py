"""One choice per cell (docs/method.md, "Model selection"): the stopping step and the knobs of a cell - one
objective on one layer pair and one subset size, over its seeds - are chosen from validation averaged over the
cell's seeds, and that one choice applies to every seed.

Two passes, every run an ordinary content-addressed run (reused when the store has it):
1. selection: every seed of every grid point trains with the usual schedule and records its validation curve.
   Per point the curves are averaged over seeds at the steps every seed evaluated; the point and step with the
   best mean are the cell's choice (ties: the earlier grid point, then the earlier step). A choice on the edge of
   a knob's grid extends that knob one step past the edge (core.objectives.EDGE_RULES: x3 for a weight) and
   chooses again, until the choice is inside the grid or a bound is hit; the record says which knobs stayed on
   an edge. Selection runs are not scored on the test split (it sees only the chosen models; a selection run
   asked for later as a run of its own is scored then).
2. final: each seed with the chosen knobs, stopped at the chosen step (`stop_step`: the same trajectory as its
   selection run up to there). Where all seeds of the chosen point trained in one stack, the loop kept their
   weights at the point's best step (train.cohorts) and those are saved as the final runs (`derived_from` says so);
   otherwise the final runs train again to that step. These are the cell's runs, the ones reports compare. A
   closed-form fit (CSA) has no step: the chosen point's selection runs are final.
With k-fold validation (a dataset with no or a very small val split) a point's selection runs are one per seed
and fold (each fold held out, the others trained on), their curves are averaged over seeds and folds alike, and
the final runs are refits: every training pair of the seed, the chosen knobs, stopped at the chosen step (a
closed-form fit is fitted again on every pair).
Every objective of a comparison goes through these same passes with the same rule, so nothing here can favour
one objective over its baseline. No test number is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stratalign.core.objectives import EDGE_RULES, Objective, Selection, objective_named
from stratalign.errors import StratalignError
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.evaluate import score_saved_run
from stratalign.stages.runs.results import RunResult
from stratalign.stages.runs.training import save_derived_final, train_runs
from stratalign.stages.subsets import KFOLD, cell_validation
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry, lacks_test_scores
from stratalign.train.cohorts import Cohort
from stratalign.train.validation import SELECT_METRICS, ValidationTargets, check_select

DEFAULT_METRIC = "rsum"
MAX_EXTENSIONS = 3  # steps past a grid's edge, per knob and direction


@dataclass(frozen=True)
class PointResult:
    """One grid point of a cell: its knobs, its selection runs (one per seed, or per seed and fold, seed-major)
    and their mean validation curve; `curves` holds each run's values at `steps`, `folds` each run's fold."""

    knobs: dict[str, Any]
    runs: tuple[str, ...]
    steps: tuple[int, ...]
    mean: tuple[float, ...]
    best_step: int | None  # None for a closed-form fit
    best_value: float
    curves: tuple[tuple[float, ...], ...] = ()
    folds: tuple[int | None, ...] = ()

    def per_fold(self) -> list[dict[str, Any]]:
        """Per fold (k-fold cells): its runs and its curve averaged over the seeds (the evidence `mean` averages)."""
        out = []
        for f in sorted({f for f in self.folds if f is not None}):
            idx = [i for i, g in enumerate(self.folds) if g == f]
            curve = np.mean([self.curves[i] for i in idx], axis=0)
            out.append({"fold": f, "run_ids": [self.runs[i] for i in idx],
                        "curve": [[s, float(m)] for s, m in zip(self.steps, curve)]})
        return out


@dataclass(frozen=True)
class CellChoice:
    """A cell's choice and its evidence; `final` holds the cell's runs, one per seed (in `seeds` order)."""

    cell: RunConfig
    seeds: tuple[int, ...]
    metric: str
    key: str
    knobs: dict[str, Any]
    step: int | None
    value: float
    points: tuple[PointResult, ...]
    on_edge: tuple[str, ...]
    final: tuple[str, ...]
    trained: int = 0
    tried: int = 0
    extended: dict[str, list[Any]] = field(default_factory=dict)
    folds: int = 0  # k of k-fold validation (0: the val split or carved pairs)

    def label(self) -> str:
        """e.g. 'lam=30, step 80' (the knobs chosen and the step)."""
        return choice_label(self.knobs, self.step)

    def record(self) -> dict[str, Any]:
        """JSON-able record kept beside each final run (store.runs.save_tuning)."""
        kfold = {"validation": "kfold", "folds": self.folds, "final": "refit on every training pair"} if self.folds else {}
        rule = "seeds and folds" if self.folds else "seeds"
        return {"rule": f"one choice per cell: validation averaged over the cell's {rule}", "metric": self.metric,
                "key": self.key, "split": "validation", **kfold, "seeds": list(self.seeds), "chosen": self.knobs,
                "step": self.step, "value": self.value, "on_edge": list(self.on_edge),
                "extended": {k: list(v) for k, v in self.extended.items()}, "final_runs": list(self.final),
                "grid": [{"knobs": p.knobs, "run_ids": list(p.runs), "run_id": p.runs[0], "best_step": p.best_step,
                          "value": p.best_value, "curve": [[s, m] for s, m in zip(p.steps, p.mean)],
                          **({"per_fold": p.per_fold()} if self.folds else {})}
                         for p in self.points]}


def choice_label(knobs: dict[str, Any], step: int | None) -> str:
    """How a cell's choice reads: 'lam=30, step 80' (a closed-form fit has no step)."""
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items()]
    return ", ".join(parts + ([f"step {step}"] if step is not None else []))


@dataclass
class _Cell:
    """A cell being chosen: its seed-free config, seeds, objective, metric and the points tried so far."""

    cfg: RunConfig
    seeds: list[int]
    objective: Objective
    metric: str
    base_options: tuple[tuple[str, Any], ...]
    fixed: dict[str, Any]
    points: list[dict[str, Any]]
    folds: tuple[int | None, ...] = (None,)  # the selection runs of a seed: one per fold (k-fold), else one
    results: dict[int, PointResult] = field(default_factory=dict)  # point index -> result
    extensions: dict[tuple[str, int], int] = field(default_factory=dict)  # (knob, direction) -> steps taken
    extended: dict[str, list[Any]] = field(default_factory=dict)
    trained: int = 0  # runs this call trained (the others were in the store)
    kept: dict[int, list[RunResult]] = field(default_factory=dict)  # the best point's selection runs with weights kept

    def run_config(self, point: dict[str, Any], seed: int, stop_step: int | None = None,
                   fold: int | None = None) -> RunConfig:
        options = self.base_options + tuple(point.items())
        if stop_step is not None:
            options += (("stop_step", stop_step),)
        return replace(self.cfg, seed=seed, options=options, fold=fold)

    def selection_configs(self, i: int) -> list[RunConfig]:
        """Point i's selection runs: per seed, one per fold (k-fold) or one."""
        return [self.run_config(self.points[i], s, fold=f) for s in self.seeds for f in self.folds]

    def cohort(self, key: str) -> Cohort | None:
        """The seeds of a point, whose weights the loop keeps at the point's best step (train.cohorts): a final run
        is then its selection run stopped there. None for k-fold cells (their finals are refits on other pairs) and
        closed-form fits (no step)."""
        if self.kfold or self.objective.selection is not Selection.VALIDATION:
            return None
        return Cohort(key, len(self.seeds))

    @property
    def kfold(self) -> bool:
        return self.folds != (None,)

    @property
    def curve_key(self) -> tuple[str, bool]:
        if self.objective.selection is Selection.VAL_COMM:
            return "comm_loss", False
        return SELECT_METRICS[self.metric]


def _cell_metric(cfg: RunConfig, metric: str | None) -> str:
    chosen = metric or cfg.select or dict(cfg.options).get("select") or DEFAULT_METRIC
    return check_select(chosen)


def _cells(store: FeatureStore, cfgs: Sequence[RunConfig], tune: bool,
           metric: str | None) -> tuple[list[_Cell], list[tuple[int, int]]]:
    """The cells of `cfgs` (one per config that differs only in its seed; a config's fold is left out, as the
    cell's folds are all trained) and, per config, (cell, seed index)."""
    cells: list[_Cell] = []
    index: dict[str, int] = {}
    where = []
    for cfg in cfgs:
        objective = objective_named(cfg.objective)
        grid = dict(objective.grid) if tune else {}
        fixed = {k: v for k, v in cfg.options if k in grid}
        base = tuple((k, v) for k, v in cfg.options if k not in grid and k != "stop_step")
        key = repr(replace(cfg, seed=0, options=base, fold=None))
        if key not in index:
            points = grid_points(objective, fixed) if grid else [{}]
            index[key] = len(cells)
            source = cell_validation(store.dataset(cfg.dataset), cfg.validation)
            kfold = source == KFOLD  # its runs name their validation (a lone run's auto never means k-fold)
            cell_cfg = replace(cfg, seed=0, options=base, fold=None,
                               validation="kfold" if kfold else cfg.validation)
            cells.append(_Cell(cell_cfg, [], objective, _cell_metric(cfg, metric), base, fixed, points,
                               tuple(range(cfg.folds)) if kfold else (None,)))
        cell = cells[index[key]]
        if cfg.seed not in cell.seeds:
            cell.seeds.append(cfg.seed)
        where.append((index[key], cell.seeds.index(cfg.seed)))
    return cells, where


def grid_points(objective: Objective, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the objective's grid values, in grid order; a knob in `fixed` keeps its value."""
    names = [k for k, _ in objective.grid]
    values = [(fixed[k],) if k in fixed else tuple(v) for k, v in objective.grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _point_result(cell: _Cell, point: dict[str, Any], metrics: list[dict[str, Any]]) -> PointResult:
    """The mean validation curve over the cell's seeds (and folds), at the steps every run evaluated, and its best
    step."""
    key, higher = cell.curve_key
    closed = cell.objective.selection is Selection.CLOSED_FORM
    curves = []
    for met in metrics:
        rows = [r for r in met.get("val_curve") or [] if isinstance(r, dict) and r.get(key) is not None]
        if not rows:
            raise StratalignError(f"run {met.get('run_id')} has no validation {key} (a dataset without labels has no "
                                  "zero-shot; a run trained before 2026-11-25 has no curve): choose on rsum or "
                                  "clip_loss, or train it again with --force")
        curves.append({int(r["step"]): float(r[key]) for r in rows})
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if closed:
        steps = steps[-1:]
    table = np.array([[c[s] for s in steps] for c in curves])
    mean = table.mean(axis=0)
    finite = np.where(np.isfinite(mean))[0]
    if not len(finite):
        raise StratalignError(f"every validation {key} of {cell.cfg.objective} is non-finite: nothing to choose from")
    best = finite[np.argmax(mean[finite])] if higher else finite[np.argmin(mean[finite])]  # first on a tie
    return PointResult(point, tuple(m["run_id"] for m in metrics), tuple(steps), tuple(float(v) for v in mean),
                       None if closed else steps[best], float(mean[best]),
                       tuple(tuple(float(v) for v in row) for row in table), cell.folds * len(cell.seeds))


def _best(cell: _Cell) -> int:
    """Index of the best point so far (the earlier point on a tie)."""
    _, higher = cell.curve_key
    order = sorted(cell.results)
    best = order[0]
    for i in order[1:]:
        a, b = cell.results[i].best_value, cell.results[best].best_value
        if (a > b) if higher else (a < b):
            best = i
    return best


def _extensions(cell: _Cell) -> list[dict[str, Any]]:
    """New points one step past each grid edge that the current choice sits on (EDGE_RULES), if any."""
    if not cell.objective.grid:
        return []
    chosen = cell.points[_best(cell)]
    out = []
    for knob, _ in cell.objective.grid:
        if knob in cell.fixed or knob not in EDGE_RULES or knob not in chosen:  # not tuned: nothing to extend
            continue
        tried = sorted({p[knob] for p in cell.points})
        value, (factor, low, high) = chosen[knob], EDGE_RULES[knob]
        for direction, edge in ((1, tried[-1]), (-1, tried[0])):
            if value != edge or cell.extensions.get((knob, direction), 0) >= MAX_EXTENSIONS:
                continue
            new = value * factor if direction > 0 else value / factor
            new = type(value)(round(new)) if isinstance(value, int) else float(f"{new:.6g}")
            if not low <= new <= high or new in tried:
                continue
            cell.extensions[(knob, direction)] = cell.extensions.get((knob, direction), 0) + 1
            cell.extended.setdefault(knob, []).append(new)
            out.append({**chosen, knob: new})
    return out


def _on_edge(cell: _Cell, chosen: dict[str, Any]) -> tuple[str, ...]:
    edges = []
    for knob, _ in cell.objective.grid:
        if knob in cell.fixed or knob not in chosen:
            continue
        tried = sorted({p[knob] for p in cell.points})
        if len(tried) > 1 and chosen[knob] in (tried[0], tried[-1]):
            edges.append(knob)
    return tuple(edges)


def choose_cells(store: FeatureStore, cfgs: Sequence[RunConfig], *, tune: bool = True, metric: str | None = None,
                 force: bool = False, progress: bool = False) -> tuple[list[CellChoice], list[str]]:
    """Choose every cell of `cfgs` (configs that differ only in their seed form one cell) and train its final runs.

    tune: choose the knobs of each objective's grid too (else each cell is its one point and only the step is
    chosen). metric: the validation metric (default: the cells' --select, else rsum; CoMM chooses on its own loss).
    Returns the cells' choices and, per config of `cfgs`, the run id of its final run."""
    cells, where = _cells(store, cfgs, tune, metric)
    pending = [(c, i) for c in cells for i in range(len(c.points))]
    while pending:
        configs = [cfg for cell, i in pending for cfg in cell.selection_configs(i)]
        cohorts = [cell.cohort(f"{cells.index(cell)}:{i}") for cell, i in pending for _ in cell.selection_configs(i)]
        results = iter(train_runs(store, configs, force=force, progress=progress, cohorts=cohorts,
                                  test=[False] * len(configs)))
        for cell, i in pending:
            got = [next(results) for _ in range(len(cell.seeds) * len(cell.folds))]
            cell.trained += sum(not r.get("skipped") for r in got)
            cell.results[i] = _point_result(cell, cell.points[i], got)
            if all(r.trained is not None for r in got):
                cell.kept[i] = got
        pending = []
        for cell in cells:
            best = _best(cell)
            cell.kept = {i: got for i, got in cell.kept.items() if i == best}  # only the chosen point's are needed
            for point in _extensions(cell):
                cell.points.append(point)
                pending.append((cell, len(cell.points) - 1))
    finals = _final_runs(store, cells, force, progress)
    registry = RunRegistry(store)
    choices = []
    for cell, (final, done) in zip(cells, finals):
        best = cell.results[_best(cell)]
        key, _ = cell.curve_key
        choice = CellChoice(cell.cfg, tuple(cell.seeds), "comm_loss" if key == "comm_loss" else cell.metric, key,
                            best.knobs, best.best_step, best.best_value,
                            tuple(cell.results[i] for i in sorted(cell.results)), _on_edge(cell, best.knobs),
                            tuple(final), trained=cell.trained + done,
                            tried=len(cell.points) * len(cell.seeds) * len(cell.folds)
                            + (len(final) if best.best_step is not None or cell.kfold else 0),
                            extended=dict(cell.extended), folds=len(cell.folds) if cell.kfold else 0)
        for rid in final:
            registry.save_tuning(rid, choice.record())
        choices.append(choice)
    return choices, [choices[c].final[s] for c, s in where]


def _final_runs(store: FeatureStore, cells: list[_Cell], force: bool,
                progress: bool) -> list[tuple[list[str], int]]:
    """Per cell, (its final run ids in seed order, how many runs trained): every seed with the chosen knobs, stopped
    at the chosen step (k-fold: the refit on every training pair); a closed-form cell's chosen selection runs as they
    are (k-fold: fitted again on every training pair)."""
    registry = RunRegistry(store)
    out: list[tuple[list[str], int] | None] = []
    derived: list[list[RunResult | None]] = []
    targets: dict[tuple, ValidationTargets] = {}  # the derived finals' validation targets, built once per split
    configs: list[RunConfig] = []
    for cell in cells:
        i = _best(cell)
        best = cell.results[i]
        if best.best_step is None and not cell.kfold:  # the chosen fits are the cell's runs: scored on test now
            for rid in best.runs:
                if lacks_test_scores(registry.metrics(rid)):
                    score_saved_run(store, rid)
            out.append((list(best.runs), 0))
            derived.append([])
            continue
        out.append(None)
        finals = [cell.run_config(best.knobs, s, best.best_step) for s in cell.seeds]
        kept = cell.kept.get(i) or [None] * len(finals)
        done = [None if k is None else save_derived_final(store, cfg, k, force=force, targets=targets)
                for cfg, k in zip(finals, kept)]
        derived.append(done)
        configs += [cfg for cfg, d in zip(finals, done) if d is None]
    results = iter(train_runs(store, configs, force=force, progress=progress)) if configs else iter(())
    filled = []
    for got, done in zip(out, derived):
        if got is not None:
            filled.append(got)
            continue
        runs = [d if d is not None else next(results) for d in done]
        filled.append(([r["run_id"] for r in runs], sum(not r.get("skipped") for r in runs)))
    return filled
