"""What runs of aligned heads must share to train as one group (train.heads_loop): the job a run is handed, the
fields one shared step needs, and the keys that split jobs into groups and a group's runs into regulariser calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stratalign.core.objectives import Objective, objective_named
from stratalign.train.cohorts import Cohort
from stratalign.train.config import TrainConfig
from stratalign.train.rules import Progress, SelectionRule
from stratalign.train.unpaired import unpaired_counts
from stratalign.train.validation import ValidationTargets

__all__ = ["SHARED_FIELDS", "GroupProgress", "HeadsJob", "group_key"]

# TrainConfig fields one step of a group shares; every other field may differ from run to run
SHARED_FIELDS = ("head", "head_options", "dim", "lr", "betas", "weight_decay", "max_steps", "eval_every", "tau",
                 "device", "amp", "precision")
# group progress: (steps done over all runs, steps planned over all runs, runs finished, runs in all)
GroupProgress = Callable[[int, int, int, int], None]


@dataclass
class HeadsJob:
    """One run for `train_heads_many`: its config, its rows of the shared tables, what validation needs."""

    cfg: TrainConfig
    train_idx: np.ndarray
    val_idx: np.ndarray
    targets: ValidationTargets
    selection: SelectionRule
    graphs: tuple[torch.Tensor, torch.Tensor] | None = None  # kNN graphs over the training rows (device)
    progress: Progress | None = None
    unpaired: tuple[torch.Tensor, torch.Tensor] | None = None  # its unpaired pools: positions in UnpairedTables
    cohort: Cohort | None = None  # the seeds of its grid point: the loop keeps their weights at the point's best step


def group_key(job: HeadsJob, dims: tuple[int, int]) -> tuple:
    """What runs must share to train in one group (see the module docstring)."""
    cfg = job.cfg
    obj = objective_named(cfg.objective)
    shared = tuple((k, repr(getattr(cfg, k))) for k in SHARED_FIELDS)
    # runs without a regulariser stack apart: beside regularised runs their gradients moved by ~1e-8 (measured,
    # cause not found), which a validation near-tie can turn into another restored step
    return (shared, min(cfg.batch_size, len(job.train_idx)), dims, obj.samples_embeddings(cfg),
            obj.regulariser is None, unpaired_counts(cfg.unpaired, job.unpaired))


def loss_key(cfg: TrainConfig, obj: Objective) -> str:
    """Runs whose objective and regulariser settings agree compute their regulariser in one call (weights may
    differ); '' for objectives without one."""
    if obj.regulariser is None:
        return ""
    return repr((obj.name, tuple((k, repr(getattr(cfg, k))) for k in obj.knobs if k != obj.weight_knob)))
