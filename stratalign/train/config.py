"""Training settings and results: `TrainConfig` (everything one run needs, JSON-able) and `TrainResult`.

Objective and head names are checked against the objective registry (stratalign.core.objectives).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from stratalign.core import losses as L
from stratalign.core.objectives import HEADS, objective_named
from stratalign.errors import StratalignError


@dataclass
class TrainConfig:
    """Everything one training run needs; JSON-able (`asdict`) and rebuilt by `TrainConfig(**d)`.

    warm-up: `warmup_fraction` (of max_steps), when set, wins over `warmup_steps`. The warm-up only
    applies to the structure objectives (the lambda of 3.2 step 5). `patience` and `eval_every` are
    in optimiser steps; patience only counts from the first candidate checkpoint.
    """

    objective: str = "clip"
    head: str = "linear"
    head_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 512
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    batch_size: int = 4096
    max_steps: int = 3000
    patience: int = 300
    eval_every: int = 10
    tau: float = 0.05
    lam: float = 10.0
    warmup_steps: int = 1000
    warmup_fraction: float | None = None
    levels: int = 1
    weighting: str = "none"
    centering: str = "mean"
    js: str = "reference"
    knn_k: int = 10
    beta: float = 0.01
    vib_scale: float = 1.0
    vib_symmetric: bool = False
    comm_dim: int = 512
    comm_out: int = 256
    comm_heads: int = 8
    comm_tau: float = 0.1
    aug_drop: float = 0.1
    aug_noise: float = 0.1
    csa_ridge: float = 1e-3
    csa_refine_steps: int = 0
    csa_refine_lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.head_options = dict(self.head_options or {})
        objective_named(self.objective)  # unknown -> one error listing the registry
        if self.head not in HEADS:
            raise StratalignError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        for name in ("dim", "batch_size", "max_steps", "patience", "eval_every", "levels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StratalignError(f"TrainConfig.{name} must be a positive integer, not {v!r}")
        for name in ("warmup_steps", "knn_k", "csa_refine_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StratalignError(f"TrainConfig.{name} must be an integer >= 0, not {v!r}")
        for name in ("lr", "tau", "comm_tau"):
            if not getattr(self, name) > 0:
                raise StratalignError(f"TrainConfig.{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("lam", "beta", "weight_decay", "csa_ridge", "vib_scale"):
            if not getattr(self, name) >= 0:
                raise StratalignError(f"TrainConfig.{name} must be >= 0, not {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise StratalignError(f"TrainConfig.betas must be two numbers in [0, 1), not {self.betas!r}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction <= 1:
            raise StratalignError(f"TrainConfig.warmup_fraction must be in [0, 1], not {self.warmup_fraction}")
        if self.weighting not in L.WEIGHTINGS:
            raise StratalignError(f"TrainConfig.weighting must be one of {L.WEIGHTINGS}, not {self.weighting!r}")
        if self.centering not in L.CENTERINGS:
            raise StratalignError(f"TrainConfig.centering must be one of {L.CENTERINGS}, not {self.centering!r}")
        if self.js not in L.JS_FORMS:
            raise StratalignError(f"TrainConfig.js must be one of {L.JS_FORMS}, not {self.js!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise StratalignError(f"TrainConfig.device must be auto, cpu or cuda[:n], not {self.device!r}")
        if objective_named(self.objective).warmup and self.resolved_warmup() > self.max_steps:
            raise StratalignError(
                f"warm-up of {self.resolved_warmup()} steps exceeds max_steps={self.max_steps}: no checkpoint "
                "after the warm-up could be chosen; lower warmup_steps or use warmup_fraction")

    def resolved_warmup(self) -> int:
        """Warm-up length in optimiser steps (0 for objectives without a lambda warm-up)."""
        if not objective_named(self.objective).warmup:
            return 0
        if self.warmup_fraction is not None:
            return int(round(self.warmup_fraction * self.max_steps))
        return int(self.warmup_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise StratalignError(f"unknown training option(s) {bad}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """A finished run: the restored model and how it was chosen.

    history: one dict per optimiser step {"step", "lr", "lambda", "loss", "clip", "reg"} (+ "val_clip"
    on evaluated steps; step 0 holds only the initial val_clip). Row s holds the lr and lambda of the
    update that produced step s. For comm, "clip" is the CoMM loss and "val_clip" the validation CoMM loss.
    lambda_at_best: the lambda of the last update before best_step (history's "lambda" there; 0 at step 0).
    """

    model: nn.Module
    config: TrainConfig
    best_step: int
    lambda_at_best: float
    best_val_clip: float
    warmup_steps: int
    steps_taken: int
    stopped_reason: str  # max_steps | early_stopping | non_finite
    message: str
    restored_before_warmup: bool
    history: list[dict[str, Any]]
    seconds: float
    device: str
    group_size: int = 1  # runs that shared the training loop (seconds is this run's share of it)

    @property
    def restored_step(self) -> int:
        return self.best_step

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for metrics.json (validation curve, not the per-step history)."""
        curve = [[h["step"], h["val_clip"]] for h in self.history if h.get("val_clip") is not None]
        return {"best_step": self.best_step, "lambda_at_best": self.lambda_at_best,
                "best_val_clip": self.best_val_clip, "warmup_steps": self.warmup_steps,
                "steps_taken": self.steps_taken, "stopped_reason": self.stopped_reason,
                "message": self.message, "restored_before_warmup": self.restored_before_warmup,
                "train_device": self.device, "val_curve": curve}
