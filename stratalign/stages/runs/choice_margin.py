"""How clearly a cell's choice beat its runner-up on validation (docs/method.md § 3.9).

A cell chooses the grid point whose seed-averaged validation curve peaks highest. When the runner-up point sits
within the seeds' noise of it, the choice is a near-tie: any small perturbation (another precision's features,
another seed) may tip it, and then every seed of the cell moves at once, with its test numbers. So each choice is
reported with its margin: per seed (folds averaged first), the chosen point's validation value at its best step less the
runner-up's at its own best step, the mean of those paired differences, and a 95 % interval from resampling the
seeds (as the seed level of the two-level comparisons). `clear` says whether the interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stratalign.stages.runs.cells import CellChoice, PointResult
from stratalign.train.validation import SELECT_METRICS

DRAWS = 2000


@dataclass(frozen=True)
class ChoiceMargin:
    """The chosen point against the runner-up: their knobs, the mean paired margin (in the choice's favour, in the
    validation metric's units) and its 95 % seed-resampled interval."""

    runner_up: dict
    margin: float
    low: float
    high: float

    @property
    def clear(self) -> bool:
        return self.low > 0


def choice_margin(choice: CellChoice, draws: int = DRAWS) -> ChoiceMargin | None:
    """The margin of a cell's choice over its best other grid point; None for a cell of one point."""
    chosen = next((p for p in choice.points if p.knobs == choice.knobs), None)
    others = [p for p in choice.points if p.knobs != choice.knobs]
    if chosen is None or not others:
        return None
    higher = SELECT_METRICS[choice.metric][1] if choice.metric in SELECT_METRICS else False  # CoMM: its loss
    runner = max(others, key=lambda p: p.best_value if higher else -p.best_value)
    diff = _at_best(chosen) - _at_best(runner)
    if not higher:
        diff = -diff
    if not len(diff):
        return None
    if choice.folds:  # runs are seed-major, k folds a seed: the seed is what is resampled
        diff = diff.reshape(len(choice.seeds), -1).mean(axis=1)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return ChoiceMargin(runner.knobs, float(diff.mean()), float(low), float(high))


def _at_best(point: PointResult) -> np.ndarray:
    """Each run's validation value at the point's best step (a closed-form fit: its one step)."""
    curves = np.asarray(point.curves, dtype=np.float64)
    if not curves.size:
        return np.zeros(0)
    col = point.steps.index(point.best_step) if point.best_step is not None else len(point.steps) - 1
    return curves[:, col]
