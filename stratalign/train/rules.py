"""The rules of the optimisation loop (docs/method.md § 3.8), shared by the loop of aligned heads
(train.heads_loop) and the loop of one fusion model (train.fusion_loop: CoMM, CSA's refinement): batches, the
cosine schedule, autocast, checkpoint selection and its restore, the history rows.

Batches are index permutations of the training tensor (no DataLoader). AdamW with a cosine schedule over
`max_steps`, gradient-norm clip 1.0 per parameter group (one per head), seeded so the same call twice gives
bit-identical weights on CPU. At every evaluation step (multiples of eval_every and the last step, the same
for every objective of a comparison; plus the end of a warm-up, the first candidate, when it falls between
them) the model is scored on validation (`score()`: a dict of yardsticks, see
train.validation); the checkpoint with the best value of the selection metric among the candidates (steps
after the warm-up) is restored, and training stops early after `patience` steps without improvement. A
NaN/inf loss stops training and keeps the best checkpoint (no exception). Progress (step, validation metric,
ETA) goes to an optional callback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from stratalign.errors import StratalignError
from stratalign.train.config import TrainConfig

# step_loss(batch rows, step) -> (loss, clip, reg); score() -> {yardstick: value}; lam_of(step) -> lambda in force
StepLoss = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Score = Callable[[], dict[str, float]]
# the history keeps the loss yardstick (CLIP, or CoMM's own loss) under its older name
_HISTORY_KEYS = {"clip_loss": "val_clip", "comm_loss": "val_clip"}
# progress(step, max_steps, the selection metric's latest value): called at every evaluation step
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class SelectionRule:
    """Which validation yardstick picks the checkpoint: its key in score()'s dict, and its direction."""

    metric: str  # the name users give (rsum | zeroshot | clip_loss | comm_loss)
    key: str  # the key of score()'s dict
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        """Whether a is strictly better than b."""
        return a > b if self.higher_is_better else a < b


def cosine_factor(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def epoch_batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: a seeded permutation cut into full batches (b = min(batch, n))."""
    b = min(batch, n)
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + b] for s in range(0, n - b + 1, b)]


def autocast(dev: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; a no-op context on the CPU."""
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                          enabled=bool(enabled and dev.type == "cuda"))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class CheckpointSelector:
    """Checkpoint selection (docs/method.md § 3.8): the best validation value among the candidate steps.

    The candidates are every evaluation step, the same for every objective of a comparison: a warm-up shapes the
    weight lambda_t, it never restricts where a run may stop. `floor` > 0 reproduces the rule of runs recorded
    before 2026-12-06 (no candidate before the warm-up ends; the best earlier value only a fallback when no
    candidate was ever finite): their run ids promise that rule. `stop_step` fixes the restored step instead
    (the step one choice per cell took from validation averaged over the cell's seeds)."""

    def __init__(self, floor: int, patience: int, selection: SelectionRule, stop_step: int | None = None) -> None:
        self.warmup, self.patience, self.selection, self.stop_step = floor, patience, selection, stop_step
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.fallback: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def offer(self, step: int, val: float, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Keep (a copy of the weights from `state()`) when `val` is the best so far (with a fixed stop step:
        when `step` is that step, whatever its value)."""
        if self.stop_step is not None:
            if step == self.stop_step:
                self.best = (val, step, state())
            return
        if not math.isfinite(val):
            return
        better = self.selection.better
        if step >= self.warmup:
            if self.best is None or better(val, self.best[0]):
                self.best = (val, step, state())
        elif self.fallback is None or better(val, self.fallback[0]):
            self.fallback = (val, step, state())

    def should_stop(self, step: int) -> bool:
        if self.stop_step is not None:
            return step >= self.stop_step
        return self.best is not None and step - self.best[1] >= self.patience

    def chosen(self) -> tuple[float, int, dict[str, torch.Tensor], bool]:
        """(validation value, step, weights, restored_before_warmup) of the checkpoint to restore."""
        if self.best is not None:
            return (*self.best, False)
        if self.fallback is None:
            raise StratalignError(f"the validation {self.selection.metric} was never finite, not even for the initial "
                                  "heads: check the feature scale (inputs this large overflow float32)")
        return (*self.fallback, True)


def stop_reason(cfg: TrainConfig, step: int, selection: SelectionRule) -> tuple[int, str, str]:
    """(step, reason, message) of a run that stops before max_steps: at its fixed stop step, or by patience."""
    if cfg.stop_step is not None:
        return step, "fixed_step", f"reached stop_step={cfg.stop_step}"
    return step, "early_stopping", f"no validation {selection.metric} improvement for {cfg.patience} steps"


def evaluation_due(step: int, cfg: TrainConfig, floor: int) -> bool:
    """Whether `step` is an evaluation step: multiples of eval_every, the last step, the fixed stop step; and for
    a run recorded under the old rule (`floor` > 0), the end of its warm-up."""
    return (step % cfg.eval_every == 0 or step == cfg.max_steps or step == cfg.stop_step
            or (floor > 0 and step == floor))


# a step waiting for its losses to leave the device: (step, lr, lambda, [loss, clip, reg] on the device)
Pending = tuple[int, float, float, torch.Tensor]


def history_rows(pending: list[Pending], values: np.ndarray) -> tuple[list[dict[str, Any]], int | None]:
    """The history rows of pending steps (`values`: their [loss, clip, reg] on the host, one row a step), and the
    first step whose losses are not finite (None when all are)."""
    rows, bad = [], None
    for (s, lr, lam, _), (lo, cl, rg) in zip(pending, values):
        rows.append({"step": s, "lr": lr, "lambda": lam, "loss": float(lo), "clip": float(cl), "reg": float(rg)})
        if bad is None and not np.isfinite([lo, cl, rg]).all():
            bad = s
    return rows, bad


def validation_history(scores: dict[str, float]) -> dict[str, float]:
    """A validation score dict under the history's keys (the loss yardstick keeps its older name val_clip)."""
    return {_HISTORY_KEYS.get(k, f"val_{k}"): float(v) for k, v in scores.items()}


def restore_chosen(sel: CheckpointSelector, model: nn.Module, lam_of: Callable[[int], float],
                   message: str) -> tuple[float, int, float, bool, str]:
    """Load the selector's chosen checkpoint into `model` (eval mode); (its validation value, step, the lambda of
    the update that produced it, whether it is from inside the warm-up, the message saying so)."""
    best_val, best_step, state, before = sel.chosen()
    model.load_state_dict(state)
    model.eval()
    if before:
        message += (f"; no checkpoint after the {sel.warmup}-step warm-up was usable, so the restored one is "
                    "from inside the warm-up (the regulariser was not at full strength)")
    if sel.stop_step is not None:
        message += f"; stopped at step {sel.stop_step}, the step chosen for the cell on validation"
    lam_best = float(lam_of(best_step - 1)) if best_step > 0 else 0.0
    message += f"; restored step {best_step} by validation {sel.selection.metric} {best_val:.4g} (lambda {lam_best:g})"
    return best_val, best_step, lam_best, before, message


