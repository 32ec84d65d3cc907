"""The rules of the optimisation loop (METHOD.md section 3.6), shared by the batched loop of aligned heads
(train.batched) and the loop CoMM trains in (`run_loop`, here): batches, the cosine schedule, checkpoint
selection and its restore.

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
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from stratalign.errors import StratalignError
from stratalign.train.config import TrainConfig, TrainResult

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


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: a seeded permutation cut into full batches (b = min(batch, n))."""
    b = min(batch, n)
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + b] for s in range(0, n - b + 1, b)]


def autocast(dev: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; a no-op context on the CPU."""
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                          enabled=bool(enabled and dev.type == "cuda"))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class CheckpointSelector:
    """Checkpoint selection: the best validation value among candidates (step >= warmup); before the
    warm-up ends, the best value is only a fallback (used when no candidate was ever finite)."""

    def __init__(self, warmup: int, patience: int, selection: SelectionRule) -> None:
        self.warmup, self.patience, self.selection = warmup, patience, selection
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.fallback: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def offer(self, step: int, val: float, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Keep (a copy of the weights from `state()`) when `val` is the best so far."""
        if not math.isfinite(val):
            return
        better = self.selection.better
        if step >= self.warmup:
            if self.best is None or better(val, self.best[0]):
                self.best = (val, step, state())
        elif self.fallback is None or better(val, self.fallback[0]):
            self.fallback = (val, step, state())

    def should_stop(self, step: int) -> bool:
        return self.best is not None and step - self.best[1] >= self.patience

    def chosen(self) -> tuple[float, int, dict[str, torch.Tensor], bool]:
        """(validation value, step, weights, restored_before_warmup) of the checkpoint to restore."""
        if self.best is not None:
            return (*self.best, False)
        if self.fallback is None:
            raise StratalignError(f"the validation {self.selection.metric} was never finite, not even for the initial "
                                  "heads: check the feature scale (inputs this large overflow float32)")
        return (*self.fallback, True)


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
    lam_best = float(lam_of(best_step - 1)) if best_step > 0 else 0.0
    message += f"; restored step {best_step} by validation {sel.selection.metric} {best_val:.4g} (lambda {lam_best:g})"
    return best_val, best_step, lam_best, before, message


class _Loop:
    """One run of the loop: optimiser, schedule, history (losses moved off the device in bulk), selector."""

    def __init__(self, model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int,
                 cfg: TrainConfig, dev: torch.device, warmup: int, step_loss: StepLoss, score: Score,
                 selection: SelectionRule, lam_of: Callable[[int], float], progress: Progress | None) -> None:
        self.model, self.groups, self.n_train, self.cfg, self.dev = model, params_groups, n_train, cfg, dev
        self.warmup, self.step_loss, self.score, self.lam_of = warmup, step_loss, score, lam_of
        self.selection, self.progress = selection, progress
        all_params = [p for g in params_groups for p in g]
        self.opt = torch.optim.AdamW(all_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: _cosine(t, cfg.max_steps))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.sel = CheckpointSelector(warmup, cfg.patience, selection)
        self.history: list[dict[str, Any]] = [{"step": 0}]
        self.curve: list[dict[str, float]] = []  # one row per evaluation step
        self.pending: list[Pending] = []

    def evaluate(self, at: int) -> float:
        """Score the model on validation, record the curve row, offer the checkpoint; the selection value."""
        scores = self.score()
        lam = float(self.lam_of(at - 1)) if at > 0 else 0.0  # that of the update that produced this step
        self.curve.append({"step": at, **{k: float(v) for k, v in scores.items()}, "lambda": lam})
        self.history[at].update(validation_history(scores))
        v = float(scores[self.selection.key])
        self.sel.offer(at, v, lambda: _snapshot(self.model))
        if self.progress is not None:
            self.progress(at, self.cfg.max_steps, v)
        return v

    def flush(self) -> int | None:
        """Move pending step losses into the history; return the first non-finite step, if any."""
        if not self.pending:
            return None
        rows, bad = history_rows(self.pending, torch.stack([p[3] for p in self.pending]).float().cpu().numpy())
        self.history.extend(rows)
        self.pending.clear()
        return bad

    def update(self, bidx: torch.Tensor, step: int) -> int:
        """One optimiser step on a batch; returns the new step count."""
        lr = self.opt.param_groups[0]["lr"]
        lam = self.lam_of(step)
        self.model.train()
        loss, clip, reg = self.step_loss(bidx, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        self.opt.step()
        self.sched.step()
        step += 1
        self.pending.append((step, lr, lam, torch.stack([loss.detach().float(), clip.detach().float(),
                                                         reg.detach().float()])))
        return step

    def checkpoint(self, step: int) -> tuple[int, str, str] | None:
        """Record losses, evaluate, offer the checkpoint; (step, reason, message) when training stops."""
        bad = self.flush()
        if bad is not None:
            del self.history[bad + 1:]
            return bad, "non_finite", f"non-finite training loss at step {bad}"
        v = self.evaluate(step)
        if not math.isfinite(v):
            return step, "non_finite", f"non-finite validation {self.selection.metric} at step {step}"
        if self.sel.should_stop(step):
            return step, "early_stopping", f"no validation {self.selection.metric} improvement for {self.cfg.patience} steps"
        return None

    def optimise(self) -> tuple[int, str, str]:
        """Epochs of seeded batches until max_steps, early stopping or a non-finite loss."""
        cfg, step = self.cfg, 0
        self.evaluate(0)
        while True:
            for bidx in _batches(self.n_train, cfg.batch_size, self.gen):
                step = self.update(bidx.to(self.dev), step)
                if step % cfg.eval_every == 0 or step == cfg.max_steps or step == self.warmup:
                    stop = self.checkpoint(step)
                    if stop is not None:
                        return stop
                if step >= cfg.max_steps:
                    return step, "max_steps", f"reached max_steps={cfg.max_steps}"

    def finish(self, step: int, reason: str, message: str, t0: float) -> TrainResult:
        """Restore the chosen checkpoint and describe how it was chosen."""
        best_val, best_step, lam_best, before, message = restore_chosen(self.sel, self.model, self.lam_of, message)
        row = self.history[best_step]
        return TrainResult(model=self.model, config=self.cfg, best_step=best_step, lambda_at_best=lam_best,
                           best_val_clip=float(row.get("val_clip", best_val)),
                           warmup_steps=self.warmup, steps_taken=step, stopped_reason=reason, message=message,
                           restored_before_warmup=before, history=self.history, seconds=time.perf_counter() - t0,
                           device=str(self.dev), selection_metric=self.selection.metric, best_value=best_val,
                           val_curve=self.curve)


def run_loop(model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int, cfg: TrainConfig,
             dev: torch.device, warmup: int, step_loss: StepLoss, score: Score, selection: SelectionRule,
             lam_of: Callable[[int], float], progress: Progress | None = None) -> TrainResult:
    """Train `model` with the shared loop: step_loss(batch_idx, step) -> (loss, clip, reg) tensors;
    score() -> the validation yardsticks (selection.key among them); lam_of(step) -> the lambda used at that
    step (0 when none); progress(step, max_steps, value) at each evaluation step."""
    t0 = time.perf_counter()
    loop = _Loop(model, params_groups, n_train, cfg, dev, warmup, step_loss, score, selection, lam_of, progress)
    step, reason, message = loop.optimise()
    return loop.finish(step, reason, message, t0)


def run_fixed_steps(model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int, cfg: TrainConfig,
                    dev: torch.device, steps: int, lr: float,
                    batch_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`steps` AdamW updates (cfg.betas, no weight decay, no schedule, no early stopping) over seeded
    epochs of batches, gradient-norm clip 1.0 per group; leaves the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    done = 0
    while done < steps:
        for bidx in _batches(n_train, cfg.batch_size, gen):
            loss = batch_loss(bidx.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in params_groups:
                torch.nn.utils.clip_grad_norm_(group, 1.0)
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
