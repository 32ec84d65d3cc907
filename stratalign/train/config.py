"""Training settings and results: `TrainConfig` (everything one run needs, JSON-able) and `TrainResult`.

Objective and head names are checked against the objective registry (stratalign.core.objectives).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from stratalign.core import losses
from stratalign.core.heads import CSA_SIMILARITIES
from stratalign.core.objectives import HEADS, Selection, objective_named, settings_objective
from stratalign.device import PRECISIONS, resolve_precision
from stratalign.errors import StratalignError
from stratalign.train.validation import check_select

# Knobs whose default is the objective's (core.objectives: Objective.defaults). Left None, they resolve to the
# objective's default, or, for an objective without one, to the value every older run recorded: so runs of
# the objectives that do not read a knob keep their settings, and their run ids, byte for byte.
UNREAD_VALUES: dict[str, Any] = {"beta": 0.01, "vib_scale": 1.0, "csa_ridge": 1e-3, "csa_k": 0,
                                 "csa_similarity": "cosine", "comm_final_norm": False, "select": "clip_loss"}
# Knobs added after runs were recorded: left out of the recorded settings at these values (older run ids
# stay valid) and read back as these values when a record lacks them (an older run means what it meant).
# `select`: runs recorded before 2026-11-25 chose their checkpoint by the validation CLIP loss.
# `precision` (2026-12-06): every older run trained its heads in float32 on the CPU.
ADDED_KNOBS: dict[str, Any] = {"csa_k": 0, "csa_similarity": "cosine", "comm_final_norm": False,
                               "select": "clip_loss", "precision": "fp32"}


@dataclass
class TrainConfig:
    """Everything one training run needs; JSON-able (`asdict`) and rebuilt by `TrainConfig(**d)`.

    warm-up: `warmup_fraction` (of max_steps), when set, wins over `warmup_steps`. The warm-up only
    applies to the structure objectives (the lambda of 3.2 step 5). `patience` and `eval_every` are
    in optimiser steps; patience only counts from the first candidate checkpoint.
    The knobs that default to None (beta, vib_scale, csa_*, comm_final_norm) take the objective's default
    when the config is made (see UNREAD_VALUES); `to_dict` / `from_dict` are the recorded form.
    csa_k: canonical directions kept (0: every one, capped by dim); csa_similarity: weighted | cosine.
    select: the validation metric that picks the restored checkpoint (METHOD 3.6): rsum (the default of the
    objectives selected on retrieval) | zeroshot | clip_loss; CoMM selects on its own loss, CSA has nothing to
    select (both record clip_loss, the value every older run meant).
    precision: fp32 | bf16 | auto (METHOD 3.6): bf16 runs the heads' matmuls under bf16 autocast (losses stay
    float32); auto is resolved when the config is made (bf16 where the device has it), so the recorded value, and
    the run id, say what ran. Part of the run id only when not fp32. `amp` is the older CUDA-only switch: on a
    GPU, amp=True autocasts in bf16 whatever `precision` says.
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
    beta: float | None = None
    vib_scale: float | None = None
    vib_symmetric: bool = False
    comm_dim: int = 512
    comm_out: int = 256
    comm_heads: int = 8
    comm_tau: float = 0.1
    aug_drop: float = 0.1
    aug_noise: float = 0.1
    comm_final_norm: bool | None = None
    csa_ridge: float | None = None
    csa_k: int | None = None
    csa_similarity: str | None = None
    csa_refine_steps: int = 0
    csa_refine_lr: float = 1e-4
    select: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.head_options = dict(self.head_options or {})
        objective_named(self.objective)  # unknown -> one error listing the registry
        if self.head not in HEADS:
            raise StratalignError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        self._resolve_objective_defaults()
        for name in ("dim", "batch_size", "max_steps", "patience", "eval_every", "levels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StratalignError(f"TrainConfig.{name} must be a positive integer, not {v!r}")
        for name in ("warmup_steps", "knn_k", "csa_refine_steps", "csa_k"):
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
        if self.weighting not in losses.WEIGHTINGS:
            raise StratalignError(f"TrainConfig.weighting must be one of {losses.WEIGHTINGS}, not {self.weighting!r}")
        if self.centering not in losses.CENTERINGS:
            raise StratalignError(f"TrainConfig.centering must be one of {losses.CENTERINGS}, not {self.centering!r}")
        if self.js not in losses.JS_FORMS:
            raise StratalignError(f"TrainConfig.js must be one of {losses.JS_FORMS}, not {self.js!r}")
        if self.csa_similarity not in CSA_SIMILARITIES:
            raise StratalignError(f"TrainConfig.csa_similarity must be one of {CSA_SIMILARITIES}, not {self.csa_similarity!r}")
        check_select(self.select)
        settings = settings_objective(self.objective, self.head)  # csa records objective 'clip' with its own head
        if self.select != UNREAD_VALUES["select"] and settings.selection is not Selection.VALIDATION:
            raise StratalignError(f"objective {settings.name} does not select on a validation metric (CoMM: its own "
                                  f"loss, CSA: nothing to select); drop select={self.select}")
        if not isinstance(self.comm_final_norm, bool):
            raise StratalignError(f"TrainConfig.comm_final_norm must be true or false, not {self.comm_final_norm!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise StratalignError(f"TrainConfig.device must be auto, cpu or cuda[:n], not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise StratalignError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.precision == "auto":
            self.precision = resolve_precision("auto", _device_of(self.device))
        if objective_named(self.objective).warmup and self.resolved_warmup() > self.max_steps:
            raise StratalignError(
                f"warm-up of {self.resolved_warmup()} steps exceeds max_steps={self.max_steps}: no checkpoint "
                "after the warm-up could be chosen; lower warmup_steps or use warmup_fraction")

    def _resolve_objective_defaults(self) -> None:
        """Fill the knobs left None: the objective's default, else the value older runs recorded."""
        given = {k: getattr(self, k) for k in UNREAD_VALUES if getattr(self, k) is not None}
        defaults = settings_objective(self.objective, self.head).knob_defaults(given)
        for name, unread in UNREAD_VALUES.items():
            if getattr(self, name) is None:
                setattr(self, name, defaults.get(name, unread))

    def to_dict(self) -> dict[str, Any]:
        """The recorded settings (JSON-able; run ids hash them): every field, except a knob added later
        while it holds the value that older runs meant by its absence."""
        out = asdict(self)
        for name, legacy in ADDED_KNOBS.items():
            if out[name] == legacy and type(out[name]) is type(legacy):
                del out[name]
        return out

    def autocast_bf16(self, dev: torch.device) -> bool:
        """Whether the heads' matmuls run under bf16 autocast on `dev`: precision bf16 (checked against the
        hardware: a one-line error where it lacks bf16), or the older amp switch on CUDA."""
        if self.precision == "bf16":
            resolve_precision("bf16", dev)
            return True
        return bool(self.amp and dev.type == "cuda")

    def resolved_warmup(self) -> int:
        """Warm-up length in optimiser steps (0 for objectives without a lambda warm-up)."""
        if not objective_named(self.objective).warmup:
            return 0
        if self.warmup_fraction is not None:
            return int(round(self.warmup_fraction * self.max_steps))
        return int(self.warmup_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of recorded settings (`to_dict`): a missing added knob reads as its legacy value."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise StratalignError(f"unknown training option(s) {bad}; known: {sorted(known)}")
        return cls(**{**ADDED_KNOBS, **d})


def _device_of(device: str) -> torch.device:
    """The device a config's `device` names (auto: CUDA when present), without touching the allocator."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.split(":")[0])


@dataclass
class TrainResult:
    """A finished run: the restored model and how it was chosen.

    history: one dict per optimiser step {"step", "lr", "lambda", "loss", "clip", "reg"} (+ "val_clip",
    "val_rsum", "val_zs_top1" on evaluated steps; step 0 holds only the initial values). Row s holds the lr and
    lambda of the update that produced step s. For comm, "clip" is the CoMM loss and "val_clip" the validation
    CoMM loss. val_curve: one row per evaluation step {"step", "rsum", "zs_top1" (with labels), "clip_loss"
    (comm: "comm_loss"), "lambda"}; best_value is the selection metric's value at best_step.
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
    selection_metric: str = "clip_loss"
    best_value: float = float("nan")  # of the selection metric at best_step
    val_curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def restored_step(self) -> int:
        return self.best_step

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for metrics.json (validation curve and selection, not the per-step history)."""
        selection = {"metric": self.selection_metric, "step": self.best_step, "value": json_float(self.best_value),
                     "first_candidate": self.warmup_steps, "restored_before_warmup": self.restored_before_warmup,
                     "lambda": self.lambda_at_best}
        curve = [json_curve_row(row) for row in self.val_curve]
        return {"selection": selection, "best_step": self.best_step, "lambda_at_best": self.lambda_at_best,
                "best_val_clip": self.best_val_clip, "warmup_steps": self.warmup_steps,
                "steps_taken": self.steps_taken, "stopped_reason": self.stopped_reason,
                "message": self.message, "restored_before_warmup": self.restored_before_warmup,
                "train_device": self.device, "val_curve": curve}


def json_curve_row(row: dict[str, float]) -> dict[str, float | int | None]:
    """One validation-curve row for metrics.json: the step an int, the values JSON floats."""
    return {k: int(v) if k == "step" else json_float(v) for k, v in row.items()}


def json_float(v: float) -> float | None:
    """A float for JSON (NaN and inf are not JSON: None)."""
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None
