"""Stage 3 trainer (METHOD.md section 3.6): heads on cached features held on the device as one tensor.

Batches are index permutations of that tensor (no DataLoader). AdamW (betas 0.9/0.95, wd 1e-4),
lr 1e-3 with a cosine schedule over `max_steps`, gradient-norm clip 1.0 per head, seeded so the same
call twice gives bit-identical weights on CPU. Early stopping monitors the validation CLIP loss alone;
for objectives with a lambda warm-up, checkpoints before the warm-up ends are not candidates. Every
result records the step it restored and the lambda in force there. A NaN/inf loss stops training and
keeps the best checkpoint (no exception). Weights are saved with safetensors, never pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stratalign.core import losses as L
from stratalign.core.comm import CommModel, comm_step_loss
from stratalign.core.comm import fused_features as _fused_features
from stratalign.core.heads import (
    CSA,
    AlignedHeads,
    VariationalHead,
    build_head,
    build_model,
    fit_csa,
)
from stratalign.device import resolve_device
from stratalign.errors import StratalignError

OBJECTIVES = ("clip", "clip+structure", "clip+structure-knn", "clip+ib", "clip+vib", "comm")
WARMUP_OBJECTIVES = ("clip+structure", "clip+structure-knn")
HEADS = ("linear", "mlp", "residual", "csa")
CONFIG_KEY = "__stratalign_config__"


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
        if self.objective not in OBJECTIVES:
            raise StratalignError(f"unknown objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
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
        if self.objective in WARMUP_OBJECTIVES and self.resolved_warmup() > self.max_steps:
            raise StratalignError(
                f"warm-up of {self.resolved_warmup()} steps exceeds max_steps={self.max_steps}: no checkpoint "
                "after the warm-up could be chosen; lower warmup_steps or use warmup_fraction")

    def resolved_warmup(self) -> int:
        """Warm-up length in optimiser steps (0 for objectives without a lambda warm-up)."""
        if self.objective not in WARMUP_OBJECTIVES:
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


# --------------------------------------------------------------------------- helpers


def _check_inputs(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    for name, x in (("x_img", x_img), ("x_txt", x_txt)):
        if not hasattr(x, "ndim") or x.ndim != 2:
            raise StratalignError(f"{name} must be a 2-D array (pairs x features), got {getattr(x, 'shape', x)!r}")
        if not np.issubdtype(np.asarray(x[:0]).dtype, np.floating):
            raise StratalignError(f"{name} must hold floats, not {x.dtype}")
    if len(x_img) != len(x_txt):
        raise StratalignError(f"x_img has {len(x_img)} rows but x_txt has {len(x_txt)}: rows must be pairs")
    n = len(x_img)

    def idx(a: Any, name: str) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise StratalignError(f"{name} must be a 1-D integer array")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= n):
            raise StratalignError(f"{name} holds rows outside [0, {n}): min {a.min()}, max {a.max()}")
        if len(np.unique(a)) != len(a):
            raise StratalignError(f"{name} repeats rows")
        return a

    tr = idx(train_idx, "train_idx")
    if len(tr) < 2:
        raise StratalignError(f"train_idx needs at least 2 pairs, got {len(tr)}")
    if val_idx is None:
        return tr, None
    va = idx(val_idx, "val_idx")
    if len(va) < 2:
        raise StratalignError(f"val_idx needs at least 2 pairs for early stopping, got {len(va)}")
    both = np.intersect1d(tr, va)
    if both.size:
        raise StratalignError(f"train_idx and val_idx overlap in {both.size} rows, e.g. {both[:5].tolist()}")
    return tr, va


def _to_device(x: np.ndarray, rows: np.ndarray, dev: torch.device, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x[rows]), dtype=np.float32)).to(dev)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise StratalignError(f"{name} has NaN or inf in {bad} of the selected rows")
    return t


def knn_graph(x: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64 indices of each row's k nearest rows by cosine (self excluded, ties by lower index).

    Uses stratalign.core.knn.knn_indices when available, else a FAISS IndexFlatIP here."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    k = int(min(k, len(arr) - 1))
    if k <= 0:
        return np.zeros((len(arr), 0), np.int64)
    try:
        from stratalign.core.knn import knn_indices  # type: ignore[import-not-found]
    except ImportError:
        knn_indices = None
    if knn_indices is not None:
        return np.asarray(knn_indices(arr, k), dtype=np.int64)
    import faiss

    a = np.ascontiguousarray(arr, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(a.shape[1])
    index.add(a)
    _, nn_idx = index.search(a, k + 1)
    out = np.empty((len(a), k), np.int64)
    for i, row in enumerate(nn_idx):
        row = row[row != i][:k]
        out[i] = row
    return out


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: a seeded permutation cut into full batches (b = min(batch, n))."""
    b = min(batch, n)
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + b] for s in range(0, n - b + 1, b)]


def _autocast(dev: torch.device, enabled: bool):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                          enabled=bool(enabled and dev.type == "cuda"))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Selector:
    """Checkpoint selection: lowest validation loss among candidates (step >= warmup)."""

    def __init__(self, warmup: int, patience: int) -> None:
        self.warmup, self.patience = warmup, patience
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.fallback: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def offer(self, step: int, val: float, model: nn.Module) -> None:
        if not math.isfinite(val):
            return
        if step >= self.warmup:
            if self.best is None or val < self.best[0]:
                self.best = (val, step, _snapshot(model))
        elif self.fallback is None or val < self.fallback[0]:
            self.fallback = (val, step, _snapshot(model))

    def should_stop(self, step: int) -> bool:
        return self.best is not None and step - self.best[1] >= self.patience

    def chosen(self) -> tuple[float, int, dict[str, torch.Tensor], bool]:
        if self.best is not None:
            return (*self.best, False)
        if self.fallback is None:
            raise StratalignError("the validation CLIP loss was never finite, not even for the initial heads: "
                                  "check the feature scale (inputs this large overflow float32)")
        return (*self.fallback, True)


def _run_loop(model: nn.Module, params_groups: list[list[nn.Parameter]], n_train: int, cfg: TrainConfig,
              dev: torch.device, warmup: int, step_loss, val_loss, lam_of) -> TrainResult:
    """The shared optimisation loop: step_loss(batch_idx, step) -> (loss, clip, reg) tensors;
    val_loss() -> float; lam_of(step) -> the lambda used at that step (0 when none)."""
    t0 = time.perf_counter()
    all_params = [p for g in params_groups for p in g]
    opt = torch.optim.AdamW(all_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _cosine(t, cfg.max_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    sel = _Selector(warmup, cfg.patience)
    history: list[dict[str, Any]] = [{"step": 0}]
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # (step, lr, lam, [loss, clip, reg])
    step, reason, message = 0, "max_steps", ""

    def evaluate(at: int) -> float:
        v = float(val_loss())
        history[at]["val_clip"] = v
        sel.offer(at, v, model)
        return v

    def flush() -> int | None:
        """Move pending step losses into the history; return the first non-finite step, if any."""
        if not pending:
            return None
        vals = torch.stack([p[3] for p in pending]).float().cpu().numpy()
        bad = None
        for (s, lr, lam, _), (lo, cl, rg) in zip(pending, vals):
            history.append({"step": s, "lr": lr, "lambda": lam, "loss": float(lo), "clip": float(cl),
                            "reg": float(rg)})
            if bad is None and not np.isfinite([lo, cl, rg]).all():
                bad = s
        pending.clear()
        return bad

    evaluate(0)
    done = False
    while not done:
        for bidx in _batches(n_train, cfg.batch_size, gen):
            bidx = bidx.to(dev)
            lr = opt.param_groups[0]["lr"]
            lam = lam_of(step)
            model.train()
            loss, clip, reg = step_loss(bidx, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in params_groups:
                torch.nn.utils.clip_grad_norm_(group, 1.0)
            opt.step()
            sched.step()
            step += 1
            pending.append((step, lr, lam, torch.stack([loss.detach().float(), clip.detach().float(),
                                                        reg.detach().float()])))
            if step % cfg.eval_every == 0 or step == cfg.max_steps or step == warmup:
                bad = flush()
                if bad is not None:
                    del history[bad + 1:]
                    step, reason = bad, "non_finite"
                    message = f"non-finite training loss at step {bad}"
                    done = True
                    break
                v = evaluate(step)
                if not math.isfinite(v):
                    reason, message, done = "non_finite", f"non-finite validation loss at step {step}", True
                    break
                if sel.should_stop(step):
                    reason, done = "early_stopping", True
                    message = f"no validation improvement for {cfg.patience} steps"
                    break
            if step >= cfg.max_steps:
                done = True
                break
    if reason == "max_steps":
        message = f"reached max_steps={cfg.max_steps}"
    best_val, best_step, state, before = sel.chosen()
    model.load_state_dict(state)
    model.eval()
    if before:
        message += (f"; no checkpoint after the {warmup}-step warm-up was usable, so the restored one is "
                    "from inside the warm-up (the regulariser was not at full strength)")
    # the lambda of a checkpoint is that of the last update that produced it (history's "lambda" row)
    lam_best = float(lam_of(best_step - 1)) if best_step > 0 else 0.0
    message += f"; restored step {best_step} (lambda {lam_best:g})"
    return TrainResult(model=model, config=cfg, best_step=best_step, lambda_at_best=lam_best,
                       best_val_clip=best_val, warmup_steps=warmup, steps_taken=step, stopped_reason=reason,
                       message=message, restored_before_warmup=before, history=history,
                       seconds=time.perf_counter() - t0, device=str(dev))


# --------------------------------------------------------------------------- heads


def make_heads(cfg: TrainConfig, d_img: int, d_txt: int) -> AlignedHeads:
    """Fresh image and text heads for a config (variational for clip+vib)."""
    if cfg.head == "csa":
        raise StratalignError("the csa head is fitted in closed form: use train_csa / fit_csa")
    opts = dict(cfg.head_options)
    if cfg.objective == "clip+vib":
        opts["variational"] = True
    return AlignedHeads(build_head(cfg.head, d_img, cfg.dim, **opts), build_head(cfg.head, d_txt, cfg.dim, **opts))


@torch.no_grad()
def _val_clip(model: AlignedHeads, xi: torch.Tensor, xt: torch.Tensor, cfg: TrainConfig,
              dev: torch.device) -> float:
    """Validation CLIP loss: fixed chunks of min(batch, n_val) rows, size-weighted mean; VIB uses mu."""
    model.eval()
    b = min(cfg.batch_size, len(xi))
    total, count = 0.0, 0
    for s in range(0, len(xi), b):
        a, t = xi[s:s + b], xt[s:s + b]
        if len(a) < 2:
            continue
        with _autocast(dev, cfg.amp):
            zi, zt = _embed_t(model.image, a), _embed_t(model.text, t)
        total += float(L.clip_loss(zi, zt, cfg.tau)) * len(a)
        count += len(a)
    return total / count


def _embed_t(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(head, VariationalHead):
        return head.embed(x)
    return head(x)


def knn_graphs(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The frozen-space kNN graphs of METHOD 3.3 over the training rows (positions within train_idx),
    exactly as `train_heads` would build them; compute once per subset and pass as `graphs=`."""
    rows = np.asarray(train_idx, dtype=np.int64)
    return (knn_graph(np.ascontiguousarray(x_img[rows], dtype=np.float32), k),
            knn_graph(np.ascontiguousarray(x_txt[rows], dtype=np.float32), k))


def _check_graphs(graphs: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed (image, text) graphs must be what `knn_graphs` gives for these n rows and this k."""
    if not isinstance(graphs, (tuple, list)) or len(graphs) != 2:
        raise StratalignError("graphs must be an (image graph, text graph) pair from knn_graphs")
    width = max(0, min(k, n - 1))
    out = []
    for name, g in zip(("image", "text"), graphs):
        g = np.asarray(g)
        if g.shape != (n, width) or (g.size and not np.issubdtype(g.dtype, np.integer)):
            raise StratalignError(f"precomputed {name} kNN graph has shape {g.shape} ({g.dtype}); expected "
                                  f"({n}, {width}) integers for {n} training rows and knn_k={k}")
        if g.size and (g.min() < 0 or g.max() >= n or (g == np.arange(n)[:, None]).any()):
            raise StratalignError(f"precomputed {name} kNN graph holds rows outside [0, {n}) or a row as its "
                                  "own neighbour: it was built for another subset")
        out.append(g.astype(np.int64))
    return out[0], out[1]


def train_heads(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                cfg: TrainConfig, *, graphs: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train image and text heads on paired rows x_img[i] <-> x_txt[i] (METHOD 3.1-3.4, 3.6).

    graphs: for clip+structure-knn, the (image, text) kNN graphs from `knn_graphs` for this train_idx
    and cfg.knn_k (e.g. read from a cache); built here when None."""
    if cfg.objective == "comm":
        if graphs is not None:
            raise StratalignError("graphs= is only used by the clip+structure-knn objective, not comm")
        return train_comm(x_img, x_txt, train_idx, val_idx, cfg)
    if graphs is not None and cfg.objective != "clip+structure-knn":
        raise StratalignError(f"graphs= is only used by the clip+structure-knn objective, not {cfg.objective}")
    tr, va = _check_inputs(x_img, x_txt, train_idx, val_idx)
    dev = resolve_device(cfg.device)
    xi, xt = _to_device(x_img, tr, dev, "x_img"), _to_device(x_txt, tr, dev, "x_txt")
    vi, vt = _to_device(x_img, va, dev, "x_img"), _to_device(x_txt, va, dev, "x_txt")
    warmup = cfg.resolved_warmup()
    structure = cfg.objective in WARMUP_OBJECTIVES
    if cfg.objective == "clip+structure-knn":
        g_img, g_txt = (_check_graphs(graphs, len(tr), cfg.knn_k) if graphs is not None
                        else (knn_graph(xi, cfg.knn_k), knn_graph(xt, cfg.knn_k)))
        graphs = (torch.from_numpy(g_img).to(dev), torch.from_numpy(g_txt).to(dev))
    sopts = {"tau": cfg.tau, "levels": cfg.levels, "weighting": cfg.weighting, "centering": cfg.centering,
             "js": cfg.js}
    zero = torch.zeros((), device=dev)

    def lam_of(step: int) -> float:
        return L.lambda_at(step, cfg.lam, warmup) if structure else 0.0

    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = make_heads(cfg, xi.shape[1], xt.shape[1]).to(dev)

        def knn_term(head: nn.Module, x_all: torch.Tensor, graph: torch.Tensor, bidx: torch.Tensor,
                     xb: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
            nbr = graph[bidx]  # (b, k)
            mask = ~torch.isin(nbr, bidx)  # neighbours already in the batch are in the support once
            if not bool(mask.any()):  # e.g. full-batch training: the support is the batch (3.3 == 3.2)
                return L.structure_regularizer(xb, zb, **sopts)
            # the head runs once on each distinct neighbour outside the batch; the rest are masked, so
            # their table index (0) is never read
            picked = nbr[mask]
            outside = picked.unique()  # sorted, so searchsorted finds each row's table index
            index = torch.zeros_like(nbr)
            index[mask] = torch.searchsorted(outside, picked)
            x_tab = x_all[outside]
            z_tab = head(x_tab).to(zb.dtype)
            return L.structure_regularizer_knn(xb, zb, x_tab, z_tab, mask, nbr_index=index, **sopts)

        def step_loss(bidx: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            a, t = xi[bidx], xt[bidx]
            with _autocast(dev, cfg.amp):
                if cfg.objective == "clip+vib":
                    mu_i, lv_i = model.image(a)
                    mu_t, lv_t = model.text(t)
                    zi = VariationalHead.sample(mu_i.float(), lv_i.float(), cfg.vib_scale)
                    zt = VariationalHead.sample(mu_t.float(), lv_t.float(), cfg.vib_scale)
                else:
                    zi, zt = model.image(a), model.text(t)
                clip = L.clip_loss(zi, zt, cfg.tau)
                if cfg.objective == "clip":
                    return clip, clip, zero
                if cfg.objective == "clip+vib":
                    reg = L.vib_kl(mu_i, lv_i, mu_t, lv_t, symmetric=cfg.vib_symmetric)
                    return clip + cfg.beta * reg, clip, reg
                if cfg.objective == "clip+ib":
                    reg = L.ib_deterministic(zi, zt)
                    return clip + cfg.beta * reg, clip, reg
                if graphs is None:
                    reg = 0.5 * (L.structure_regularizer(a, zi, **sopts) + L.structure_regularizer(t, zt, **sopts))
                else:
                    reg = 0.5 * (knn_term(model.image, xi, graphs[0], bidx, a, zi)
                                 + knn_term(model.text, xt, graphs[1], bidx, t, zt))
                return clip + lam_of(step) * reg, clip, reg

        groups = [[p for p in model.image.parameters() if p.requires_grad],
                  [p for p in model.text.parameters() if p.requires_grad]]
        return _run_loop(model, groups, len(tr), cfg, dev, warmup, step_loss,
                         lambda: _val_clip(model, vi, vt, cfg, dev), lam_of)


# --------------------------------------------------------------------------- CoMM


def train_comm(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
               cfg: TrainConfig) -> TrainResult:
    """Train the CoMM fusion model (METHOD 3.5) with the same loop; early stopping monitors the
    validation CoMM loss (views drawn from a fixed seed, so the yardstick does not move)."""
    tr, va = _check_inputs(x_img, x_txt, train_idx, val_idx)
    dev = resolve_device(cfg.device)
    xi, xt = _to_device(x_img, tr, dev, "x_img"), _to_device(x_txt, tr, dev, "x_txt")
    vi, vt = _to_device(x_img, va, dev, "x_img"), _to_device(x_txt, va, dev, "x_txt")
    std_i, std_t = xi.std(0, keepdim=True), xt.std(0, keepdim=True)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = CommModel(xi.shape[1], xt.shape[1], dim=cfg.comm_dim, heads=cfg.comm_heads,
                          out_dim=cfg.comm_out).to(dev)
        zero = torch.zeros((), device=dev)
        aug = {"tau": cfg.comm_tau, "drop": cfg.aug_drop, "noise": cfg.aug_noise}

        def step_loss(bidx: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with _autocast(dev, cfg.amp):
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
                with _autocast(dev, cfg.amp):
                    v = comm_step_loss(model, vi[s:s + b], vt[s:s + b], std_i, std_t, generator=g, **aug)
                total += float(v) * len(vi[s:s + b])
                count += len(vi[s:s + b])
            return total / count

        return _run_loop(model, [[p for p in model.parameters() if p.requires_grad]], len(tr), cfg, dev, 0,
                         step_loss, val_loss, lambda s: 0.0)


# --------------------------------------------------------------------------- CSA


def refine_csa(model: CSA, x_img: np.ndarray, x_txt: np.ndarray, cfg: TrainConfig) -> CSA:
    """Optional R_S refinement: `cfg.csa_refine_steps` AdamW steps on the CSA projections with
    clip + lam * structure (full lambda, no warm-up, no early stopping)."""
    steps = cfg.csa_refine_steps
    if steps == 0:
        return model
    dev = resolve_device(cfg.device)
    rows = np.arange(len(x_img))
    xi, xt = _to_device(x_img, rows, dev, "x_img"), _to_device(x_txt, rows, dev, "x_txt")
    model = model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.csa_refine_lr, betas=cfg.betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sopts = {"tau": cfg.tau, "levels": cfg.levels, "weighting": cfg.weighting, "centering": cfg.centering,
             "js": cfg.js}
    model.train()
    done = 0
    while done < steps:
        for bidx in _batches(len(xi), cfg.batch_size, gen):
            a, t = xi[bidx.to(dev)], xt[bidx.to(dev)]
            zi, zt = model.image(a), model.text(t)
            reg = 0.5 * (L.structure_regularizer(a, zi, **sopts) + L.structure_regularizer(t, zt, **sopts))
            loss = L.clip_loss(zi, zt, cfg.tau) + cfg.lam * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.image.parameters()), 1.0)
            torch.nn.utils.clip_grad_norm_(list(model.text.parameters()), 1.0)
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
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


# --------------------------------------------------------------------------- evaluation & storage


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray | torch.Tensor, modality: str, batch_size: int = 8192) -> torch.Tensor:
    """Normalised embeddings of rows x through the image or text head (VIB: z = normalise(mu)),
    float32 on the CPU."""
    if not isinstance(model, AlignedHeads):
        raise StratalignError(f"embed needs aligned heads, not {type(model).__name__} (CoMM: use fused_features)")
    head = model.head(modality)
    d_in = head.config["d_in"]
    if x.ndim != 2 or x.shape[1] != d_in:
        raise StratalignError(f"{modality} head expects (n, {d_in}) features, got {tuple(x.shape)}")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(x), batch_size):
            chunk = x[s:s + batch_size]
            t = chunk.float() if isinstance(chunk, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(chunk, dtype=np.float32))
            out.append(_embed_t(head, t.to(dev)).float().cpu())
    finally:
        model.train(was)
    width = head.config["d_out"]
    return torch.cat(out) if out else torch.zeros(0, width)


def embed_features(model: nn.Module, x: np.ndarray, modality: str) -> np.ndarray:
    """`embed` as a float32 numpy array."""
    return embed(model, x, modality).numpy()


def fused_features(model: nn.Module, x_img: np.ndarray, x_txt: np.ndarray) -> np.ndarray:
    """The CoMM fused CLS output of each pair (for the linear probe)."""
    if not isinstance(model, CommModel):
        raise StratalignError(f"fused_features needs a CoMM model, not {type(model).__name__}")
    return _fused_features(model, x_img, x_txt)


def _model_of(obj: Any) -> nn.Module:
    return obj.model if isinstance(obj, TrainResult) else obj


def model_tensors(model: nn.Module | TrainResult) -> dict[str, torch.Tensor]:
    """The model's tensors plus its JSON config as a uint8 tensor (so `model_from_tensors` can
    rebuild it from a plain safetensors file)."""
    m = _model_of(model)
    out = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
    blob = json.dumps(m.config, sort_keys=True).encode()
    out[CONFIG_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return out


def model_from_tensors(config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a model from `model_tensors` output (the run `config` is accepted for symmetry; the
    model's own config travels inside the tensors)."""
    if CONFIG_KEY not in tensors:
        raise StratalignError(f"saved weights lack {CONFIG_KEY}: not written by stratalign's model_tensors")
    mcfg = json.loads(bytes(tensors[CONFIG_KEY].numpy().tobytes()).decode())
    model = build_model(mcfg)
    state = {k: v for k, v in tensors.items() if k != CONFIG_KEY}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StratalignError(f"saved weights do not fit their config: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


def save_heads(path: str | Path, result: TrainResult | nn.Module) -> Path:
    """Write the model to a safetensors file; the model config (and, for a TrainResult, the train
    config and summary) go in the file's metadata as JSON."""
    m = _model_of(result)
    path = Path(path)
    meta = {"stratalign_model": json.dumps(m.config, sort_keys=True)}
    if isinstance(result, TrainResult):
        meta["stratalign_train"] = json.dumps(asdict(result.config), sort_keys=True)
        meta["stratalign_summary"] = json.dumps(result.summary(), sort_keys=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}, str(path), metadata=meta)
    return path


def load_heads(path: str | Path) -> nn.Module:
    """Rebuild the model saved by `save_heads` (AlignedHeads, CSA or CommModel), in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StratalignError(f"no heads file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise StratalignError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None
    if "stratalign_model" not in meta:
        raise StratalignError(f"{path} has no stratalign_model metadata: not written by save_heads")
    model = build_model(json.loads(meta["stratalign_model"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise StratalignError(f"{path}: weights do not fit their config: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


# --------------------------------------------------------------------------- runner adapters


def train_run(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
              cfg: TrainConfig, *, graphs: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[nn.Module, dict[str, Any]]:
    """`train_heads` as (model, summary) for the stage-3 runner."""
    res = train_heads(x_img, x_txt, train_idx, val_idx, cfg, graphs=graphs)
    return res.model, {**res.summary(), "train_loop_seconds": round(res.seconds, 3)}


def train_comm_run(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                   cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """`train_comm` as (model, summary) for the stage-3 runner."""
    res = train_comm(x_img, x_txt, train_idx, val_idx, cfg)
    return res.model, {**res.summary(), "train_loop_seconds": round(res.seconds, 3)}
