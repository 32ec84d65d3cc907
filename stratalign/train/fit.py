"""Fitting models on paired features: aligned heads and CoMM through the shared loop, CSA, Procrustes and ASIF in
closed form.

Each objective's loss comes from its registry entry (stratalign.core.objectives): the trainer embeds the
batch, takes the CLIP loss and adds the entry's regulariser with its weight. Every result records the
step it restored and the lambda in force there.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stratalign.core import losses
from stratalign.core.comm import CommModel, comm_step_loss
from stratalign.core.heads import CSA, CSABasis, csa_basis, fit_csa
from stratalign.core.objectives import Objective, Side, StepBatch, Training, objective_named, objectives_with, structure_term
from stratalign.device import resolve_device
from stratalign.errors import StratalignError
from stratalign.train.cohorts import Cohort
from stratalign.train.config import TrainConfig, TrainResult, json_curve_row
from stratalign.train.data import check_inputs, to_device
from stratalign.train.frozen_graphs import training_graphs
from stratalign.train.fusion_loop import run_fixed_steps, run_loop
from stratalign.train.heads_groups import GroupProgress, HeadsJob
from stratalign.train.heads_loop import train_heads_many
from stratalign.train.inference import embed
from stratalign.train.rules import Progress, SelectionRule, autocast
from stratalign.train.unpaired import check_unpaired, unpaired_tables
from stratalign.train.validation import SELECT_METRICS, ValidationTargets, Validator

COMM_SELECTION = SelectionRule("comm_loss", "comm_loss", False)  # a fused model is selected on its own loss

Graphs = tuple[np.ndarray, np.ndarray]


def selection_of(cfg: TrainConfig, targets: ValidationTargets) -> SelectionRule:
    """The run's selection metric; zeroshot needs labelled validation images and class prompts."""
    key, higher = SELECT_METRICS[cfg.select]
    if cfg.select == "zeroshot" and not targets.has_zeroshot:
        raise StratalignError("select zeroshot needs validation labels and class prompts (a dataset with a label "
                              "column); use select rsum or clip_loss")
    return SelectionRule(cfg.select, key, higher)


def _check_objective(cfg: TrainConfig, graphs: Graphs | None) -> Objective:
    obj = objective_named(cfg.objective)
    if graphs is not None and not obj.knn_graphs:
        users = " / ".join(objectives_with(knn_graphs=True))
        raise StratalignError(f"graphs= is only used by the {users} objective, not {cfg.objective}")
    if obj.training is Training.CLOSED_FORM:
        raise StratalignError(f"objective {obj.name} is fitted in closed form: use train_csa")
    return obj


@dataclass
class RunSpec:
    """One run of aligned heads for `train_many`: its config, its rows of the shared feature arrays, and what
    validation and the kNN form need (see `train_heads`)."""

    cfg: TrainConfig
    train_idx: np.ndarray
    val_idx: np.ndarray
    graphs: Graphs | None = None
    targets: ValidationTargets | None = None
    progress: Progress | None = None
    unpaired: tuple[np.ndarray, np.ndarray] | None = None  # its unpaired rows of train_many's `unpaired` arrays
    cohort: Cohort | None = None  # the seeds of its grid point (train.cohorts): weights kept at the point's best step


def train_many(x_img: np.ndarray, x_txt: np.ndarray, specs: list[RunSpec], *,
               on_step: GroupProgress | None = None,
               unpaired: tuple[np.ndarray, np.ndarray] | None = None) -> list[TrainResult]:
    """Train many runs of aligned heads on paired rows x_img[i] <-> x_txt[i] in batched groups (train.heads_loop):
    the rows they use go to the device once, runs that can share a step train in one loop. Every spec is checked
    before anything trains. The results in spec order; each equals the run trained alone (`train_heads`).
    unpaired: (image features, caption features) without partners; a run with cfg.unpaired > 0 names its rows of
    each in `spec.unpaired` and adds cfg.unpaired of them to every R_S batch (docs/method.md § 3.11)."""
    if not specs:
        return []
    checked = []
    for spec in specs:
        obj = _check_objective(spec.cfg, spec.graphs)
        if obj.training is not Training.GRADIENT:
            raise StratalignError(f"objective {obj.name} is not trained as aligned heads: use fit_objective")
        tr, va = check_inputs(x_img, x_txt, spec.train_idx, spec.val_idx, fixed_stop=spec.cfg.stop_step is not None)
        check_unpaired(spec.cfg.unpaired, spec.unpaired, unpaired)
        targets = spec.targets if spec.targets is not None else ValidationTargets.pairs_only(len(va))
        checked.append((spec, obj, tr, va, targets, selection_of(spec.cfg, targets)))
    devs = {str(resolve_device(s.cfg.device)) for s in specs}
    if len(devs) > 1:
        raise StratalignError(f"train_many: the runs ask for different devices {sorted(devs)}; train them apart")
    dev = resolve_device(specs[0].cfg.device)
    for spec in specs:  # precision bf16 where the hardware lacks it: refused before anything trains
        spec.cfg.autocast_bf16(dev)
    used = np.unique(np.concatenate([np.concatenate([tr, va]) for _, _, tr, va, _, _ in checked]))
    xi, xt = to_device(x_img, used, dev, "x_img"), to_device(x_txt, used, dev, "x_txt")
    tables = unpaired_tables(unpaired, specs, dev)
    jobs = []
    for spec, obj, tr, va, targets, selection in checked:
        tr_pos, va_pos = np.searchsorted(used, tr), np.searchsorted(used, va)
        graphs = None
        if obj.knn_graphs:
            rows = torch.from_numpy(tr_pos).to(dev)
            graphs = training_graphs(spec.graphs, xi[rows], xt[rows], spec.cfg.knn_k, dev)
        pools = None if not spec.cfg.unpaired or spec.unpaired is None else \
            tuple(torch.from_numpy(np.asarray(p, dtype=np.int64)).to(dev) for p in spec.unpaired)
        jobs.append(HeadsJob(spec.cfg, tr_pos, va_pos, targets, selection, graphs, spec.progress, pools, spec.cohort))
    return train_heads_many(xi, xt, jobs, dev, on_step=on_step, unpaired=tables)


def train_heads(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                cfg: TrainConfig, *, graphs: Graphs | None = None, targets: ValidationTargets | None = None,
                progress: Progress | None = None, unpaired: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train image and text heads on paired rows x_img[i] <-> x_txt[i] (docs/method.md § 3.1-3.4, 3.6): the one-run case
    of `train_many`; a CoMM objective goes to `train_comm`.

    graphs: for objectives with kNN graphs, the (image, text) graphs from `knn_graphs` for this train_idx
    and cfg.knn_k (e.g. read from a cache); built here when None.
    targets: the validation pairs' images (for the rsum gallery), labels and class prompts (for zero-shot);
    None: each validation pair is its own image and there is no zero-shot yardstick.
    progress: called at every evaluation step with (step, max_steps, selection value).
    unpaired: (image features, caption features) without partners, every row a candidate for the R_S batches of a
    run with cfg.unpaired > 0 (docs/method.md § 3.11)."""
    obj = _check_objective(cfg, graphs)
    if obj.training is Training.COMM:
        return train_comm(x_img, x_txt, train_idx, val_idx, cfg, progress=progress)
    pools = None if unpaired is None else (np.arange(len(unpaired[0])), np.arange(len(unpaired[1])))
    return train_many(x_img, x_txt, [RunSpec(cfg, train_idx, val_idx, graphs, targets, progress, pools)],
                      unpaired=unpaired)[0]


def train_comm(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
               cfg: TrainConfig, *, progress: Progress | None = None) -> TrainResult:
    """Train the CoMM fusion model (docs/method.md § 3.5) with the same loop; early stopping monitors the
    validation CoMM loss (views drawn from a fixed seed, so the yardstick does not move)."""
    tr, va = check_inputs(x_img, x_txt, train_idx, val_idx, fixed_stop=cfg.stop_step is not None)
    dev = resolve_device(cfg.device)
    xi, xt = to_device(x_img, tr, dev, "x_img"), to_device(x_txt, tr, dev, "x_txt")
    vi, vt = to_device(x_img, va, dev, "x_img"), to_device(x_txt, va, dev, "x_txt")
    std_i, std_t = xi.std(0, keepdim=True), xt.std(0, keepdim=True)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = CommModel(xi.shape[1], xt.shape[1], dim=cfg.comm_dim, heads=cfg.comm_heads,
                          out_dim=cfg.comm_out, final_norm=cfg.comm_final_norm).to(dev)
        zero = torch.zeros((), device=dev)
        bf16 = cfg.autocast_bf16(dev)
        aug = {"tau": cfg.comm_tau, "drop": cfg.aug_drop, "noise": cfg.aug_noise}

        def step_loss(bidx: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with autocast(dev, bf16):
                loss = comm_step_loss(model, xi[bidx], xt[bidx], std_i, std_t, **aug)
            return loss, loss, zero

        @torch.no_grad()
        def val_loss() -> dict[str, float]:
            model.eval()
            g = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
            b = min(cfg.batch_size, len(vi))
            total, count = 0.0, 0
            for s in range(0, len(vi), b):
                if len(vi[s:s + b]) < 2:
                    continue
                with autocast(dev, bf16):
                    v = comm_step_loss(model, vi[s:s + b], vt[s:s + b], std_i, std_t, generator=g, **aug)
                total += float(v) * len(vi[s:s + b])
                count += len(vi[s:s + b])
            return {"comm_loss": total / count}

        return run_loop(model, [[p for p in model.parameters() if p.requires_grad]], len(tr), cfg, dev, 0,
                        step_loss, val_loss, COMM_SELECTION, lambda s: 0.0, progress)


def refine_csa(model: CSA, x_img: np.ndarray, x_txt: np.ndarray, cfg: TrainConfig) -> CSA:
    """Optional R_S refinement: `cfg.csa_refine_steps` AdamW steps on the CSA projections with
    clip + lam * structure (full lambda, no warm-up, no early stopping)."""
    steps = cfg.csa_refine_steps
    if steps == 0:
        return model
    dev = resolve_device(cfg.device)
    rows = np.arange(len(x_img))
    xi, xt = to_device(x_img, rows, dev, "x_img"), to_device(x_txt, rows, dev, "x_txt")
    model = model.to(dev)

    def batch_loss(bidx: torch.Tensor) -> torch.Tensor:
        a, t = xi[bidx], xt[bidx]
        zi, zt = model.image(a), model.text(t)
        reg = structure_term(StepBatch(bidx, Side(a, zi), Side(t, zt)), cfg)
        return losses.clip_loss(zi, zt, cfg.tau) + cfg.lam * reg

    groups = [list(model.image.parameters()), list(model.text.parameters())]
    run_fixed_steps(model, groups, len(xi), cfg, dev, steps, cfg.csa_refine_lr, batch_loss)
    return model.cpu()


class _CsaBases:
    """The last few CSA decompositions (core.heads.csa_basis) by training pairs and ridge: the points of a k grid
    over one subset share one decomposition (stages.runs.training fits such runs one after another). Keyed by a
    digest of the pairs' bytes, so a basis is only ever read for the very rows it was computed from."""

    def __init__(self, size: int = 4) -> None:
        self.size, self.items = size, OrderedDict()  # type: ignore[var-annotated]

    def get(self, x_img: np.ndarray, x_txt: np.ndarray, ridge: float) -> CSABasis:
        key = (_digest(x_img), _digest(x_txt), float(ridge))
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        basis = self.items[key] = csa_basis(x_img, x_txt, ridge)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return basis


def _digest(x: np.ndarray) -> tuple:
    a = np.ascontiguousarray(x)
    return a.shape, str(a.dtype), hashlib.blake2b(a.view(np.uint8).reshape(-1), digest_size=16).digest()


_CSA_BASES = _CsaBases()


def train_csa(x_img: np.ndarray, x_txt: np.ndarray, cfg: TrainConfig) -> tuple[CSA, dict[str, Any]]:
    """Closed-form CSA on the training pairs (dim = cfg.dim capped by the feature widths), then the
    optional R_S refinement. Returns (model, summary)."""
    t0 = time.perf_counter()
    basis = _CSA_BASES.get(x_img, x_txt, cfg.csa_ridge)
    model = fit_csa(None, None, dim=cfg.dim, ridge=cfg.csa_ridge, k=cfg.csa_k, similarity=cfg.csa_similarity,
                    basis=basis)
    model = refine_csa(model, x_img, x_txt, cfg)
    d = int(model.correlations.numel())  # canonical directions kept
    return model, {"best_step": cfg.csa_refine_steps, "lambda_at_best": cfg.lam if cfg.csa_refine_steps else 0.0,
                   "stopped_reason": "closed_form", "csa_dim": d,
                   "csa_top_correlations": [round(float(c), 4) for c in model.correlations[:5]],
                   "train_seconds_fit": round(time.perf_counter() - t0, 3)}


def closed_form_validation(model: nn.Module, x_img: np.ndarray, x_txt: np.ndarray, val_idx: np.ndarray,
                           cfg: TrainConfig, targets: ValidationTargets | None, *,
                           step: int | None = None) -> dict[str, Any]:
    """`selection` and a one-row `val_curve` for a fit with nothing to select: the validation yardsticks of
    the fitted model (what `tune` compares grid values by); step: the fit's steps (CSA's refinement steps)."""
    vi = torch.from_numpy(np.ascontiguousarray(x_img[val_idx], dtype=np.float32))
    vt = torch.from_numpy(np.ascontiguousarray(x_txt[val_idx], dtype=np.float32))
    targets = targets if targets is not None else ValidationTargets.pairs_only(len(val_idx))
    scores = Validator(vi, vt, targets, cfg.tau, cfg.batch_size).score(lambda m, x: embed(model, x, m))
    step = cfg.csa_refine_steps if step is None else step
    lam = cfg.lam if step else 0.0
    row = {"step": step, **scores, "lambda": lam}
    return {"selection": {"metric": "closed_form", "step": step, "value": None, "first_candidate": step,
                          "restored_before_warmup": False, "lambda": lam},
            "val_curve": [json_curve_row(row)]}


def fit_run(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
            cfg: TrainConfig, *, graphs: Graphs | None = None, targets: ValidationTargets | None = None,
            progress: Progress | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """`train_heads` (or `train_comm`) as (model, summary) for a runner."""
    res = train_heads(x_img, x_txt, train_idx, val_idx, cfg, graphs=graphs, targets=targets, progress=progress)
    return res.model, {**res.summary(), "train_loop_seconds": round(res.seconds, 3)}


def _fit_closed_form(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                     cfg: TrainConfig, *, graphs: Graphs | None = None, targets: ValidationTargets | None = None,
                     progress: Progress | None = None) -> tuple[nn.Module, dict[str, Any]]:
    model, summary = train_csa(x_img[train_idx], x_txt[train_idx], cfg)
    return model, {**summary, **closed_form_validation(model, x_img, x_txt, val_idx, cfg, targets)}


def _fit_baseline(objective: Objective, x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, cfg: TrainConfig, targets: ValidationTargets | None) -> tuple[nn.Module, dict[str, Any]]:
    """A closed-form baseline (its registry entry's `fit`: Procrustes, ASIF) on the training pairs, with the
    validation yardsticks of the fit."""
    assert objective.fit is not None
    t0 = time.perf_counter()
    model = objective.fit(x_img[train_idx], x_txt[train_idx], cfg)
    summary = {"best_step": 0, "lambda_at_best": 0.0, "stopped_reason": "closed_form",
               "train_seconds_fit": round(time.perf_counter() - t0, 3)}
    return model, {**summary, **closed_form_validation(model, x_img, x_txt, val_idx, cfg, targets, step=0)}


_FITTERS = {Training.GRADIENT: fit_run, Training.COMM: fit_run, Training.CLOSED_FORM: _fit_closed_form}


def fit_objective(objective: Objective, x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, cfg: TrainConfig, *, graphs: Graphs | None = None,
                  targets: ValidationTargets | None = None,
                  progress: Progress | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fit one run's model the way its objective is trained: (model, summary)."""
    if objective.fit is not None:
        return _fit_baseline(objective, x_img, x_txt, train_idx, val_idx, cfg, targets)
    return _FITTERS[objective.training](x_img, x_txt, train_idx, val_idx, cfg, graphs=graphs, targets=targets,
                                        progress=progress)
