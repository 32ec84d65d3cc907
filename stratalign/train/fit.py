"""Fitting models on paired features: aligned heads batched (train_many; train_heads is one run of it),
CoMM through the shared loop, CSA in closed form.

Each objective's loss comes from its registry entry (stratalign.core.objectives): the trainer embeds the
batch, takes the CLIP loss and adds the entry's regulariser with its weight. Every result records the
step it restored and the lambda in force there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stratalign.core import losses as L
from stratalign.core.comm import CommModel, comm_step_loss
from stratalign.core.heads import CSA, fit_csa
from stratalign.core.objectives import (
    Objective,
    Side,
    StepBatch,
    Training,
    objective_named,
    objectives_with,
    structure_term,
)
from stratalign.device import resolve_device
from stratalign.errors import StratalignError
from stratalign.train.batched import GroupLoop, GroupRun, group_key, make_heads  # noqa: F401 (re-exported)
from stratalign.train.config import TrainConfig, TrainResult
from stratalign.train.data import check_inputs, to_device
from stratalign.train.knn import training_graphs
from stratalign.train.loop import autocast, run_fixed_steps, run_loop

Graphs = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RunSpec:
    """One run for `train_many`: its config, its training and validation rows of feature source `source`
    (an index into the sources given to train_many) and, for kNN objectives, precomputed graphs."""

    cfg: TrainConfig
    train_idx: np.ndarray
    val_idx: np.ndarray
    source: int = 0
    graphs: Graphs | None = None


def _check_objective(cfg: TrainConfig, graphs: Graphs | None) -> Objective:
    obj = objective_named(cfg.objective)
    if graphs is not None and not obj.knn_graphs:
        users = " / ".join(objectives_with(knn_graphs=True))
        raise StratalignError(f"graphs= is only used by the {users} objective, not {cfg.objective}")
    if obj.training is Training.CLOSED_FORM:
        raise StratalignError(f"objective {obj.name} is fitted in closed form: use train_csa")
    return obj


def train_heads(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                cfg: TrainConfig, *, graphs: Graphs | None = None, progress: bool = False) -> TrainResult:
    """Train image and text heads on paired rows x_img[i] <-> x_txt[i] (METHOD 3.1-3.4, 3.6): the
    one-run case of `train_many` (a CoMM objective goes to `train_comm`).

    graphs: for objectives with kNN graphs, the (image, text) graphs from `knn_graphs` for this train_idx
    and cfg.knn_k (e.g. read from a cache); built here when None."""
    return train_many([(x_img, x_txt)], [RunSpec(cfg, train_idx, val_idx, graphs=graphs)], progress=progress)[0]


def train_many(sources: Sequence[tuple[np.ndarray, np.ndarray]], runs: Sequence[RunSpec], *,
               progress: bool = False, desc: str = "train") -> list[TrainResult]:
    """Train many runs, batched: runs that can share a loop (`batched.group_key`; objectives with
    `batches`) train together with stacked heads, each with its own seed, rows, knobs, warm-up, early
    stopping and restored checkpoint; other objectives (CoMM) train one by one. Results in input order.

    sources: (image features, text features) pairs; a run reads the rows of its `source`. Each group
    uploads the union of its runs' rows of each source once."""
    checked = []
    for spec in runs:
        obj = _check_objective(spec.cfg, spec.graphs)
        x_img, x_txt = sources[spec.source]
        tr, va = check_inputs(x_img, x_txt, spec.train_idx, spec.val_idx)
        checked.append((spec, obj, tr, va))
    results: list[TrainResult | None] = [None] * len(runs)
    groups: dict[tuple, list[int]] = {}
    for i, (spec, obj, tr, _) in enumerate(checked):
        if not obj.batches:
            x_img, x_txt = sources[spec.source]
            results[i] = train_comm(x_img, x_txt, spec.train_idx, spec.val_idx, spec.cfg)
            continue
        x_img, x_txt = sources[spec.source]
        dev = str(resolve_device(spec.cfg.device))
        groups.setdefault(group_key(spec.cfg, len(tr), (x_img.shape[1], x_txt.shape[1]), dev), []).append(i)
    for g, members in enumerate(groups.values()):
        label = f"{desc} {g + 1}/{len(groups)}" if len(groups) > 1 else desc
        for i, res in zip(members, _train_group(sources, [checked[i] for i in members], progress, label)):
            results[i] = res
    return [r for r in results if r is not None]


def _train_group(sources: Sequence[tuple[np.ndarray, np.ndarray]], members: list, progress: bool,
                 desc: str) -> list[TrainResult]:
    """Upload each source's rows once (union over the group), then one GroupLoop."""
    dev = resolve_device(members[0][0].cfg.device)
    parts_i, parts_t, where = [], [], {}
    offset = 0
    for src in sorted({spec.source for spec, *_ in members}):
        rows = np.unique(np.concatenate([np.concatenate([tr, va]) for spec, _, tr, va in members
                                         if spec.source == src]))
        x_img, x_txt = sources[src]
        parts_i.append(to_device(x_img, rows, dev, "x_img"))
        parts_t.append(to_device(x_txt, rows, dev, "x_txt"))
        where[src] = (rows, offset)
        offset += len(rows)
    xi, xt = torch.cat(parts_i), torch.cat(parts_t)
    specs = []
    for spec, obj, tr, va in members:
        rows, off = where[spec.source]
        tpos = torch.from_numpy(off + np.searchsorted(rows, tr)).to(dev)
        vpos = torch.from_numpy(off + np.searchsorted(rows, va)).to(dev)
        graphs = training_graphs(spec.graphs, xi[tpos], xt[tpos], spec.cfg.knn_k, dev) if obj.knn_graphs else None
        specs.append(GroupRun(spec.cfg, tpos, vpos, graphs))
    bar = tqdm(total=specs[0].cfg.max_steps, desc=desc, unit="step", disable=not progress, leave=False,
               dynamic_ncols=True)

    def on_step(step: int, runs: list) -> None:
        bar.update(1)
        if step % specs[0].cfg.eval_every == 0:
            best = [r.sel.best[0] for r in runs if r.sel.best is not None]
            active = sum(r.stop is None for r in runs)
            bar.set_postfix(runs=f"{active}/{len(runs)} active",
                            best_val=f"{min(best):.4f}" if best else "-", refresh=False)

    try:
        return GroupLoop(xi, xt, specs, dev, on_step).run()
    finally:
        bar.close()


def train_comm(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
               cfg: TrainConfig) -> TrainResult:
    """Train the CoMM fusion model (METHOD 3.5) with the same loop; early stopping monitors the
    validation CoMM loss (views drawn from a fixed seed, so the yardstick does not move)."""
    tr, va = check_inputs(x_img, x_txt, train_idx, val_idx)
    dev = resolve_device(cfg.device)
    xi, xt = to_device(x_img, tr, dev, "x_img"), to_device(x_txt, tr, dev, "x_txt")
    vi, vt = to_device(x_img, va, dev, "x_img"), to_device(x_txt, va, dev, "x_txt")
    std_i, std_t = xi.std(0, keepdim=True), xt.std(0, keepdim=True)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = CommModel(xi.shape[1], xt.shape[1], dim=cfg.comm_dim, heads=cfg.comm_heads,
                          out_dim=cfg.comm_out).to(dev)
        zero = torch.zeros((), device=dev)
        aug = {"tau": cfg.comm_tau, "drop": cfg.aug_drop, "noise": cfg.aug_noise}

        def step_loss(bidx: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with autocast(dev, cfg.amp):
                loss = comm_step_loss(model, xi[bidx], xt[bidx], std_i, std_t, **aug)
            return loss, loss, zero

        @torch.no_grad()
        def val_loss() -> float:
            model.eval()
            g = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
            b = min(cfg.batch_size, len(vi))
            total, count = 0.0, 0
            for s in range(0, len(vi), b):
                if len(vi[s:s + b]) < 2:
                    continue
                with autocast(dev, cfg.amp):
                    v = comm_step_loss(model, vi[s:s + b], vt[s:s + b], std_i, std_t, generator=g, **aug)
                total += float(v) * len(vi[s:s + b])
                count += len(vi[s:s + b])
            return total / count

        return run_loop(model, [[p for p in model.parameters() if p.requires_grad]], len(tr), cfg, dev, 0,
                        step_loss, val_loss, lambda s: 0.0)


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
        return L.clip_loss(zi, zt, cfg.tau) + cfg.lam * reg

    groups = [list(model.image.parameters()), list(model.text.parameters())]
    run_fixed_steps(model, groups, len(xi), cfg, dev, steps, cfg.csa_refine_lr, batch_loss)
    return model.cpu()


def train_csa(x_img: np.ndarray, x_txt: np.ndarray, cfg: TrainConfig) -> tuple[CSA, dict[str, Any]]:
    """Closed-form CSA on the training pairs (dim = cfg.dim capped by the feature widths), then the
    optional R_S refinement. Returns (model, summary)."""
    t0 = time.perf_counter()
    model = fit_csa(x_img, x_txt, dim=cfg.dim, ridge=cfg.csa_ridge)
    model = refine_csa(model, x_img, x_txt, cfg)
    d = int(model.image.config["d_out"])
    return model, {"best_step": cfg.csa_refine_steps, "lambda_at_best": cfg.lam if cfg.csa_refine_steps else 0.0,
                   "stopped_reason": "closed_form", "csa_dim": d,
                   "csa_top_correlations": [round(float(c), 4) for c in model.correlations[:5]],
                   "train_seconds_fit": round(time.perf_counter() - t0, 3)}


def fit_run(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
            cfg: TrainConfig, *, graphs: Graphs | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """`train_heads` (or `train_comm`) as (model, summary) for a runner."""
    res = train_heads(x_img, x_txt, train_idx, val_idx, cfg, graphs=graphs)
    return res.model, {**res.summary(), "train_loop_seconds": round(res.seconds, 3)}


def _fit_closed_form(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                     cfg: TrainConfig, *, graphs: Graphs | None = None) -> tuple[nn.Module, dict[str, Any]]:
    return train_csa(x_img[train_idx], x_txt[train_idx], cfg)


_FITTERS = {Training.GRADIENT: fit_run, Training.COMM: fit_run, Training.CLOSED_FORM: _fit_closed_form}


def fit_objective(objective: Objective, x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, cfg: TrainConfig, *,
                  graphs: Graphs | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fit one run's model the way its objective is trained: (model, summary)."""
    return _FITTERS[objective.training](x_img, x_txt, train_idx, val_idx, cfg, graphs=graphs)
