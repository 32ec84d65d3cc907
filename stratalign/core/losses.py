"""Objectives of docs/method.md § 3: CLIP loss, STRUCTURE regulariser (batch and kNN-graph forms),
information-bottleneck terms and the lambda warm-up. Pure functions over tensors.

Every loss and regulariser here is computed in float32 under any autocast, on every device (METHOD 3.6):
softmaxes at tau = 0.05, logs and matrix powers are not safe in bf16, and `.float()` alone does not do it
(autocast casts a matmul's float32 inputs back to bf16). `float32` switches autocast off for the call and casts
the inputs up; the heads' matmuls before it may still run in bf16.

Batched runs: `clip_loss`, `structure_regularizer`, `ib_deterministic` and `vib_kl` also take (S, b, d) tensors,
the stacked batches of S independent runs, and return the S losses; slice s equals the 2-D call on slice s.
The lean step's forms with hand-written backwards are in core.losses_lean.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from stratalign.errors import StratalignError

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])

EPS_LOG = 1e-12
WEIGHTINGS = ("none", "inverse")
CENTERINGS = ("mean", "none")
JS_FORMS = ("reference", "textbook")


def float32(fn: _F) -> _F:
    """Run a loss with autocast off on the device of its first tensor argument (its own `.float()` casts then
    hold): the loss is float32 whatever autocast surrounds the call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device = first.device.type if first is not None else "cpu"
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two (b, d) tensors, or two (S, b, d) stacks of S runs' batches, with the same leading shape."""
    if a.ndim not in (2, 3) or b.ndim != a.ndim or a.shape[:-1] != b.shape[:-1]:
        raise StratalignError(f"{what}: need two 2-D tensors with the same rows (or two (runs, rows, dims) stacks), "
                              f"got {tuple(a.shape)} and {tuple(b.shape)}")


@float32
def clip_loss(z_img: torch.Tensor, z_txt: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """L_clip = 1/2 [CE(S, diag) + CE(S^T, diag)], S = Z_I Z_T^T / tau (inputs already normalised)."""
    _check_pair(z_img, z_txt, "clip_loss")
    if z_img.shape[-1] != z_txt.shape[-1]:
        raise StratalignError(f"clip_loss: widths differ ({z_img.shape[-1]} vs {z_txt.shape[-1]})")
    if tau <= 0:
        raise StratalignError(f"clip_loss tau must be > 0, not {tau}")
    s = (z_img.float() @ z_txt.float().mT) / tau
    b = s.shape[-1]
    if s.ndim == 2:
        target = torch.arange(b, device=s.device)
        return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    target = torch.arange(b, device=s.device).repeat(s.shape[0])  # (S, b, b): each run's rows are its own CE
    rows = F.cross_entropy(s.reshape(-1, b), target, reduction="none").view(-1, b).mean(-1)
    cols = F.cross_entropy(s.mT.reshape(-1, b), target, reduction="none").view(-1, b).mean(-1)
    return 0.5 * (rows + cols)


def _check_options(levels: int, weighting: str, centering: str, js: str, tau: float) -> None:
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise StratalignError(f"structure levels must be an integer >= 1, not {levels!r}")
    if weighting not in WEIGHTINGS:
        raise StratalignError(f"structure weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    if centering not in CENTERINGS:
        raise StratalignError(f"structure centering must be one of {CENTERINGS}, not {centering!r}")
    if js not in JS_FORMS:
        raise StratalignError(f"structure js must be one of {JS_FORMS}, not {js!r}")
    if tau <= 0:
        raise StratalignError(f"structure tau must be > 0, not {tau}")


def _normalise_centre(x: torch.Tensor, centering: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows L2-normalised, then the batch mean subtracted (not renormalised). Returns (X~, mean)."""
    xh = F.normalize(x.float(), dim=-1)
    mu = xh.mean(-2, keepdim=True) if centering == "mean" else torch.zeros_like(xh[..., :1, :])
    return xh - mu, mu


def _kl_rows(a: torch.Tensor, b: torch.Tensor, log_b: torch.Tensor | None = None) -> torch.Tensor:
    """KL(a || b) summed over columns, averaged over rows, 1e-12 inside the logs."""
    log_b = torch.log(b + EPS_LOG) if log_b is None else log_b
    return (a * (torch.log(a + EPS_LOG) - log_b)).sum(-1).mean(-1)


def _divergence(p_x: torch.Tensor, p_z: torch.Tensor, js: str) -> torch.Tensor:
    m = 0.5 * (p_x + p_z)
    log_m = torch.log(m + EPS_LOG)
    if js == "reference":
        # the authors' code: 1/2 [KL(M||P_Z) + KL(M||P_X)], written as one pass over the b x b matrix:
        # 1/2 sum_j M (2 log M - log P_Z - log P_X), averaged over rows
        inner = 2.0 * log_m - torch.log(p_z + EPS_LOG) - torch.log(p_x + EPS_LOG)
        return 0.5 * (m * inner).sum(-1).mean(-1)
    # textbook Jensen-Shannon: 1/2 [KL(P_X||M) + KL(P_Z||M)]
    return 0.5 * (_kl_rows(p_x, m, log_m) + _kl_rows(p_z, m, log_m))


def _combine(ds: list[torch.Tensor], weighting: str) -> torch.Tensor:
    if weighting == "inverse":
        ds = [d / (i + 1) for i, d in enumerate(ds)]
    return torch.stack(ds).mean(0)


def _batch_levels(xc: torch.Tensor, zc: torch.Tensor, tau: float, levels: int, js: str,
                  first: torch.Tensor | None = None) -> list[torch.Tensor]:
    """D_l for l = 1..levels from batch affinities; `first` replaces D_1 when given (kNN form)."""
    p_x = torch.softmax((xc / tau) @ xc.mT, dim=-1)  # scaling the b x d factor, not the b x b product
    p_z = torch.softmax((zc / tau) @ zc.mT, dim=-1)
    out: list[torch.Tensor] = []
    px_l, pz_l = p_x, p_z
    for level in range(1, levels + 1):
        if level > 1:
            px_l, pz_l = px_l @ p_x, pz_l @ p_z
        if level == 1 and first is not None:
            out.append(first)
        else:
            out.append(_divergence(px_l, pz_l, js))
    return out


@float32
def structure_regularizer(x: torch.Tensor, z: torch.Tensor, tau: float = 0.05, levels: int = 1,
                          weighting: str = "none", centering: str = "mean",
                          js: str = "reference") -> torch.Tensor:
    """R_S of one modality, batch form (docs/method.md § 3.2): X frozen head inputs, Z head outputs of a batch.

    P = row-softmax(X~ X~^T / tau) with the diagonal kept; D_l compares the l-th powers;
    js="reference" is the authors' 1/2[KL(M||P_Z)+KL(M||P_X)], js="textbook" 1/2[KL(P_X||M)+KL(P_Z||M)].
    """
    _check_pair(x, z, "structure_regularizer")
    _check_options(levels, weighting, centering, js, tau)
    xc, _ = _normalise_centre(x, centering)
    zc, _ = _normalise_centre(z, centering)
    return _combine(_batch_levels(xc, zc, tau, levels, js), weighting)


@float32
def structure_regularizer_knn(x: torch.Tensor, z: torch.Tensor, x_nbr: torch.Tensor, z_nbr: torch.Tensor,
                              nbr_mask: torch.Tensor | None = None, tau: float = 0.05, levels: int = 1,
                              weighting: str = "none", centering: str = "mean",
                              js: str = "reference", nbr_index: torch.Tensor | None = None) -> torch.Tensor:
    """R_S over a kNN graph (docs/method.md § 3.3).

    x, z: (b, d) batch inputs / outputs; x_nbr, z_nbr: (b, k, d) the frozen inputs of each anchor's k
    neighbours in the whole training subset and the head's outputs on them; nbr_mask: (b, k) bool,
    False for a neighbour to leave out (the trainer masks neighbours already in the batch, so the
    support is the set union). Row i's level-1 support is the batch plus its neighbours, both centred
    with the BATCH mean; levels >= 2 use the batch block as in 3.2. With k = 0 this is 3.2.

    Compact form (what the trainer uses): with `nbr_index` (b, k), x_nbr and z_nbr are (u, d) tables of
    the distinct neighbours and row i's j-th neighbour is table row nbr_index[i, j]. Each neighbour is
    then normalised once and its logits come from one (b, u) product, not from (b, k, d) copies.
    """
    _check_pair(x, z, "structure_regularizer_knn")
    if x.ndim != 2:
        raise StratalignError("structure_regularizer_knn takes one run's (b, d) batch, not a stack of runs")
    _check_options(levels, weighting, centering, js, tau)
    b = x.shape[0]
    if nbr_index is None:
        if x_nbr.ndim != 3 or z_nbr.ndim != 3 or x_nbr.shape[:2] != z_nbr.shape[:2] or x_nbr.shape[0] != b:
            raise StratalignError(f"structure_regularizer_knn: neighbours must be (b, k, d) with b={b}, got "
                                  f"{tuple(x_nbr.shape)} and {tuple(z_nbr.shape)}")
        nbr_index = torch.arange(x_nbr.shape[0] * x_nbr.shape[1], device=x.device).view(x_nbr.shape[:2])
        x_nbr, z_nbr = x_nbr.flatten(0, 1), z_nbr.flatten(0, 1)  # the (b * k, d) table of the gathered rows
    elif (nbr_index.ndim != 2 or nbr_index.shape[0] != b or x_nbr.ndim != 2 or z_nbr.ndim != 2
          or x_nbr.shape[0] != z_nbr.shape[0]):
        raise StratalignError(f"structure_regularizer_knn: with nbr_index ({b}, k) the neighbours must be two "
                              f"(u, d) tables, got index {tuple(nbr_index.shape)} and tables "
                              f"{tuple(x_nbr.shape)}, {tuple(z_nbr.shape)}")
    k = nbr_index.shape[1]
    if nbr_mask is not None and tuple(nbr_mask.shape) != (b, k):
        raise StratalignError(f"structure_regularizer_knn: nbr_mask must be ({b}, {k}), got "
                              f"{tuple(nbr_mask.shape)}")
    xc, mx = _normalise_centre(x, centering)
    zc, mz = _normalise_centre(z, centering)
    xnc = F.normalize(x_nbr.float(), dim=-1) - mx
    znc = F.normalize(z_nbr.float(), dim=-1) - mz

    def extended(c: torch.Tensor, nc: torch.Tensor) -> torch.Tensor:
        ct = c / tau
        logits = torch.cat([ct @ c.T, torch.gather(ct @ nc.T, 1, nbr_index)], dim=1)
        if nbr_mask is not None:
            keep = torch.cat([torch.ones(b, b, dtype=torch.bool, device=c.device), nbr_mask.bool()], 1)
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits, dim=1)

    first = _divergence(extended(xc, xnc), extended(zc, znc), js)
    return _combine(_batch_levels(xc, zc, tau, levels, js, first=first), weighting)


@float32
def ib_deterministic(z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
    """R_IB = 1 - mean_i cos(z_I,i, z_T,i) (docs/method.md § 3.4, deterministic form)."""
    _check_pair(z_img, z_txt, "ib_deterministic")
    return 1.0 - F.cosine_similarity(z_img.float(), z_txt.float(), dim=-1).mean(-1)


@float32
def vib_kl(mu_i: torch.Tensor, logvar_i: torch.Tensor, mu_t: torch.Tensor, logvar_t: torch.Tensor,
           symmetric: bool = False) -> torch.Tensor:
    """KL(N(mu_I, s_I^2) || N(mu_T, s_T^2)) summed over dims, averaged over the batch; symmetric=True
    averages both directions (docs/method.md § 3.4, variational form)."""
    shapes = {tuple(t.shape) for t in (mu_i, logvar_i, mu_t, logvar_t)}
    if len(shapes) != 1 or mu_i.ndim not in (2, 3):
        raise StratalignError(f"vib_kl: mu and logvar of both heads must share one 2-D shape (or one (runs, rows, "
                              f"dims) shape), got {shapes}")

    def kl(m1: torch.Tensor, l1: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        m1, l1, m2, l2 = m1.float(), l1.float(), m2.float(), l2.float()
        per = 0.5 * (l2 - l1 + (torch.exp(l1) + (m1 - m2) ** 2) / torch.exp(l2) - 1.0)
        return per.sum(-1).mean(-1)

    forward = kl(mu_i, logvar_i, mu_t, logvar_t)
    if not symmetric:
        return forward
    return 0.5 * (forward + kl(mu_t, logvar_t, mu_i, logvar_i))


def lambda_at(step: int, lam: float = 10.0, warmup_steps: int = 1000) -> float:
    """lambda_t = lam * min(1, t / warmup_steps), t = optimiser steps already taken (not epochs)."""
    if step < 0:
        raise StratalignError(f"lambda_at: step must be >= 0, not {step}")
    if warmup_steps <= 0:
        return float(lam)
    return float(lam) * min(1.0, step / warmup_steps)
