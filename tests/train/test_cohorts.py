"""The running best of a cohort's mean validation curve (train.cohorts), as stages.runs.cells reads the curves."""

from __future__ import annotations

import math

from stratalign.train.cohorts import CohortBest, same_run_but_stop
from stratalign.train.config import TrainConfig
from stratalign.train.rules import SelectionRule


def test_mean_over_members_first_step_on_a_tie_and_non_finite_skipped() -> None:
    best = CohortBest(3, SelectionRule("rsum", "rsum", True))
    assert best.improves([1.0, 2.0, 3.0]) and best.value == 2.0
    assert not best.improves([2.0, 2.0, 2.0])  # a tie keeps the earlier step
    assert not best.improves([10.0, math.nan, 10.0])  # a mean that is not finite is no candidate
    assert not best.improves([9.0, 9.0])  # a member missing at this step: not a step every seed evaluated
    assert best.improves([3.0, 3.0, 3.0]) and best.value == 3.0
    low = CohortBest(2, SelectionRule("clip_loss", "clip_loss", False))
    assert low.improves([2.0, 4.0]) and not low.improves([3.0, 3.0]) and low.improves([1.0, 2.0])


def test_only_the_stop_step_may_differ() -> None:
    def cfg(**kw) -> TrainConfig:
        return TrainConfig(**{**dict(objective="clip+structure", max_steps=50, warmup_steps=10, seed=1), **kw})

    assert same_run_but_stop(cfg(), cfg(stop_step=20))
    assert not same_run_but_stop(cfg(), cfg(seed=2, stop_step=20))
    assert not same_run_but_stop(cfg(), cfg(lam=3.0, stop_step=20))
    assert not same_run_but_stop(cfg(), cfg())
