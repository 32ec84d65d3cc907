"""The loop of one fusion model (docs/method.md § 3.8): CoMM's fusion module (`run_loop`) and CSA's optional R_S
refinement (`run_fixed_steps`). Aligned heads train in train.heads_loop; both loops follow train.rules.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import nn

from stratalign.train.config import TrainConfig, TrainResult
from stratalign.train.optim import RunsAdamW, clip_per_run
from stratalign.train.rules import (
    CheckpointSelector,
    Pending,
    Progress,
    Score,
    SelectionRule,
    StepLoss,
    cosine_factor,
    epoch_batches,
    evaluation_due,
    history_rows,
    restore_chosen,
    snapshot,
    stop_reason,
    validation_history,
)


class FusionLoop:
    """One run of the loop: optimiser, schedule, history (losses moved off the device in bulk), selector."""

    def __init__(self, model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int,
                 cfg: TrainConfig, dev: torch.device, warmup: int, step_loss: StepLoss, score: Score,
                 selection: SelectionRule, lam_of: Callable[[int], float], progress: Progress | None) -> None:
        self.model, self.groups, self.n_train, self.cfg, self.dev = model, params_groups, n_train, cfg, dev
        self.warmup, self.step_loss, self.score, self.lam_of = warmup, step_loss, score, lam_of
        self.selection, self.progress = selection, progress
        # the aligned heads' step (train.optim): fused AdamW, one clip per group, no torch.optim (and so no
        # torch._dynamo import); the learning rate of step t is lr x cosine_factor(t)
        self.opt = RunsAdamW([p for g in params_groups for p in g], lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.sel = CheckpointSelector(warmup, cfg.patience, selection, cfg.stop_step)
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
        self.sel.offer(at, v, lambda: snapshot(self.model))
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
        lr = self.opt.lr = self.cfg.lr * cosine_factor(step, self.cfg.max_steps)
        lam = self.lam_of(step)
        self.model.train()
        loss, clip, reg = self.step_loss(bidx, step)
        self.opt.zero_grad()
        loss.backward()
        clip_per_run(self.groups, 1.0)
        self.opt.step()
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
            return stop_reason(self.cfg, step, self.selection)
        return None

    def optimise(self) -> tuple[int, str, str]:
        """Epochs of seeded batches until max_steps, early stopping or a non-finite loss."""
        cfg, step = self.cfg, 0
        self.evaluate(0)
        while True:
            for bidx in epoch_batches(self.n_train, cfg.batch_size, self.gen):
                step = self.update(bidx.to(self.dev), step)
                if evaluation_due(step, cfg, self.warmup):
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
    loop = FusionLoop(model, params_groups, n_train, cfg, dev, warmup, step_loss, score, selection, lam_of, progress)
    step, reason, message = loop.optimise()
    return loop.finish(step, reason, message, t0)


def run_fixed_steps(model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int, cfg: TrainConfig,
                    dev: torch.device, steps: int, lr: float,
                    batch_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`steps` AdamW updates (cfg.betas, no weight decay, no schedule, no early stopping; train.optim's fused step)
    over seeded epochs of batches, gradient-norm clip 1.0 per group; leaves the model in eval mode."""
    opt = RunsAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=cfg.betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    done = 0
    while done < steps:
        for bidx in epoch_batches(n_train, cfg.batch_size, gen):
            loss = batch_loss(bidx.to(dev))
            opt.zero_grad()
            loss.backward()
            clip_per_run(params_groups, 1.0)
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
