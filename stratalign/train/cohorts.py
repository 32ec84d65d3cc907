"""A cell's final runs without training them again (docs/method.md § 3.8, "one choice per cell").

A cell's final run of a seed is its selection run stopped at the step the cell chose: the same config but for
`stop_step`, so the same trajectory up to there. The step a cell chooses is the best step of one grid point's
validation curve averaged over the point's seeds. So when all seeds of a point (a cohort) train in one stack, the
loop can keep, like a run keeps its own best checkpoint, every member's weights at the best step so far of the
cohort's mean curve: if the cell then chooses that point, its final runs are those weights, already in hand.

`CohortBest` is that running best; `derived_result` turns a member's selection result and the weights kept into the
result a final run trained to `stop_step` would give (same restored step, validation curve up to it, selection
record and message), so nothing else tells the two apart but the `derived_from` record and the seconds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from stratalign.train.config import TrainConfig, TrainResult
from stratalign.train.rules import CheckpointSelector, SelectionRule, restore_chosen, stop_reason
from stratalign.train.validation import SELECT_METRICS


@dataclass(frozen=True)
class Cohort:
    """The runs one choice covers (a grid point's seeds): a key shared by the members and their number."""

    key: str
    size: int


@dataclass
class CohortCheckpoint:
    """One member's weights at its cohort's best step so far, and its share of the stack's seconds until then."""

    step: int
    state: dict[str, torch.Tensor]
    share_seconds: float


class CohortBest:
    """The running best of a cohort's mean validation curve: the mean over the members at a step every member
    evaluated (as stages.runs.cells averages the curves), the first step on a tie, non-finite means skipped."""

    def __init__(self, size: int, rule: SelectionRule) -> None:
        self.size, self.rule = size, rule
        self.value: float | None = None

    def improves(self, values: list[float]) -> bool:
        """Whether the mean of `values` (one per member, all at one step) is the best so far; it becomes it."""
        if len(values) != self.size:
            return False
        mean = float(np.mean(np.array(values, dtype=np.float64)))
        if not math.isfinite(mean) or (self.value is not None and not self.rule.better(mean, self.value)):
            return False
        self.value = mean
        return True


def same_run_but_stop(selection: TrainConfig, final: TrainConfig) -> bool:
    """Whether `final` is `selection` with a stop step (the only difference a derived final may have)."""
    return selection.stop_step is None and final.stop_step is not None and replace(final, stop_step=None) == selection


def derived_result(selection: TrainResult, final: TrainConfig, checkpoint: CohortCheckpoint, *,
                   source: str) -> TrainResult:
    """The result of `final` (the selection run's config stopped at checkpoint.step) from the selection run's result
    and the weights kept at that step: what training `final` gives, through the same selection and restore rules."""
    step = checkpoint.step
    curve = [dict(row) for row in selection.val_curve if row["step"] <= step]
    row = curve[-1]
    key, higher = SELECT_METRICS[selection.selection_metric]
    rule = SelectionRule(selection.selection_metric, key, higher)
    sel = CheckpointSelector(selection.first_candidate or 0, final.patience, rule, final.stop_step)
    sel.offer(step, float(row[key]), lambda: checkpoint.state)
    _, _, message = stop_reason(final, step, rule)
    model = copy.deepcopy(selection.model)
    best_val, best_step, lam_best, before, message = restore_chosen(sel, model, lambda _s: float(row["lambda"]),
                                                                    message)
    message += f"; the weights of selection run {source} at that step (the same trajectory), not trained again"
    history = selection.history[:step + 1]
    return TrainResult(model=model, config=final, best_step=best_step, lambda_at_best=lam_best,
                       best_val_clip=float(history[best_step].get("val_clip", best_val)),
                       warmup_steps=selection.warmup_steps, first_candidate=selection.first_candidate,
                       steps_taken=step, stopped_reason="fixed_step", message=message, restored_before_warmup=before,
                       history=history, seconds=checkpoint.share_seconds, share_seconds=checkpoint.share_seconds,
                       device=selection.device, selection_metric=selection.selection_metric, best_value=best_val,
                       val_curve=curve)


class CohortTracker:
    """The cohorts of one stack (train.heads_loop.GroupLoop) whose members all train in it; a cohort with a member
    elsewhere (another stack, or already in the store) keeps nothing."""

    def __init__(self, runs: list[Any]) -> None:
        by_key: dict[str, list[Any]] = {}
        for r in runs:
            if r.job.cohort is not None:
                by_key.setdefault(r.job.cohort.key, []).append(r)
        self.cohorts = [(members, CohortBest(len(members), members[0].job.selection))
                        for members in by_key.values() if len(members) == members[0].job.cohort.size]

    def offer(self, step: int, active: list[Any], state_of: Callable[[int], Callable[[], dict[str, torch.Tensor]]]) -> None:
        """After the evaluation of `step` (before stopped runs leave the stack): where every member of a cohort was
        evaluated at `step` and their mean is the cohort's best so far, each member keeps its weights."""
        for members, best in self.cohorts:
            if not all(r.curve and r.curve[-1]["step"] == step and r in active for r in members):
                continue
            if best.improves([float(r.curve[-1][best.rule.key]) for r in members]):
                for r in members:
                    r.checkpoint = CohortCheckpoint(step, state_of(active.index(r))(), r.share)
