"""The lean step's losses (issue 30): CLIP and R_S at level 1 of a stack of S runs (S, b, d), with their backwards
written out, in float32 under any autocast (METHOD 3.6). Equal to `losses.clip_loss` and `losses.structure_regularizer`
up to float rounding (tests/core/test_losses_lean.py); what they save is passes over the S x b x b matrices and
allocations, which on a CPU cost as much as the products:

- CLIP: one exp of the logits (shifted by each run's largest; an exp2 of the logits over ln 2, scaled so in the product),
  both cross-entropies from its row and column sums, the logits' gradient (row softmax + column softmax - 2 I) / 2b in
  two passes over that one matrix.
- R_S: the batch mean taken out of the b x b Gram matrix rather than out of the b x d rows ((X - mean)(X - mean)^T is
  P (X X^T) P, P = I - 1 1^T / b, and a row softmax of P L P is one of P L: each column less its mean, one pass),
  the divergence and its gradient from a few in-place passes, the gradient's centring P G + (P G)^T (G the softmax's
  backward, of zero row sums) in the pass that scales it, and the frozen side given (train.frozen_side takes it from
  one Gram matrix of the training rows).
"""

from __future__ import annotations

import math

import torch

from stratalign.core.losses import EPS_LOG, _check_options, _check_pair, float32
from stratalign.errors import StratalignError

# the largest spread of a run's logits whose exp (shifted by the largest) stays above float32's smallest normal
_EXP_SPREAD = 80.0
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (a @ b) for (S, n, k) @ (S, k, m), the scaling done inside the product (no pass of its own)."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    return torch.baddbmm(out, a, b, beta=0.0, alpha=alpha)


class _ClipStacked(torch.autograd.Function):
    """`clip_loss` of a stack of runs (module docstring)."""

    @staticmethod
    def forward(ctx, z_img: torch.Tensor, z_txt: torch.Tensor, tau: float) -> torch.Tensor:  # type: ignore[override]
        s = _scaled_bmm(z_img, z_txt.mT, _LOG2E / tau)  # the logits over ln 2: exp(x) as exp2 (3x faster on a CPU)
        flat = s.flatten(1)
        lo, hi = flat.amin(-1), flat.amax(-1)  # (torch.aminmax is 40x slower on a CPU)
        ctx.tau, ctx.lse = tau, float((hi - lo).max()) * _LN2 > _EXP_SPREAD
        if ctx.lse:  # tau too small for one shift per run: the two logsumexps
            s.mul_(_LN2)
            rows, cols = torch.logsumexp(s, -1), torch.logsumexp(s, -2)
            diag = s.diagonal(dim1=-2, dim2=-1)
            ctx.save_for_backward(z_img, z_txt, s, rows, cols)
            return 0.5 * ((rows - diag).mean(-1) + (cols - diag).mean(-1))
        diag = (s.diagonal(dim1=-2, dim2=-1) - hi.unsqueeze(-1)).mul_(_LN2)  # s_ii - shift
        e = s.sub_(hi.view(-1, 1, 1)).exp2_()
        rows, cols = e.sum(-1), e.sum(-2)  # the logsumexps are log(sum) + shift
        ctx.save_for_backward(z_img, z_txt, e, rows, cols)
        return 0.5 * ((rows.log() - diag).mean(-1) + (cols.log() - diag).mean(-1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        z_img, z_txt, e, rows, cols = ctx.saved_tensors
        k = (0.5 / e.shape[-1]) * grad.view(-1, 1)
        if ctx.lse:  # e holds the logits, rows and cols the logsumexps
            g = torch.exp(e - rows.unsqueeze(-1)).add_(torch.exp(e - cols.unsqueeze(-2))).mul_(k.unsqueeze(-1))
        else:  # (row softmax + column softmax) k = e (k / rows_i + k / cols_j)
            g = e * (k / rows).unsqueeze(-1)
            g.addcmul_(e, (k / cols).unsqueeze(-2))
        g.diagonal(dim1=-2, dim2=-1).sub_(2.0 * k)
        return _scaled_bmm(g, z_txt, 1.0 / ctx.tau), _scaled_bmm(g.mT, z_img, 1.0 / ctx.tau), None


@float32
def clip_loss_stacked(z_img: torch.Tensor, z_txt: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """`clip_loss` of S runs' stacked embeddings (S, b, d), in float32 with a hand-written backward (the lean step of
    bf16 runs); equal to it up to float rounding."""
    _check_pair(z_img, z_txt, "clip_loss_stacked")
    if z_img.ndim != 3 or z_img.shape[-1] != z_txt.shape[-1] or tau <= 0:
        raise StratalignError(f"clip_loss_stacked: need two (S, b, d) stacks of one width and tau > 0, got "
                              f"{tuple(z_img.shape)}, {tuple(z_txt.shape)}, tau {tau}")
    return _ClipStacked.apply(z_img.float(), z_txt.float(), float(tau))


class _StructureGiven(torch.autograd.Function):
    """R_S at level 1 of a stack of runs (S, b, d) against given frozen-side affinities (module docstring). In the
    divergence's gradient with respect to P_Z, M / (M + e) and P_Z / (P_Z + e) are 1 - e / (. + e): a constant the
    softmax's backward cancels, and a rest that moves a logit's gradient by at most 2e, left out where it stands
    alone (the textbook form) and where it multiplies P_Z - M (the reference form)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, p_x: torch.Tensor, px_e: torch.Tensor, tau: float, centre: bool,  # type: ignore[override]
                reference: bool, unit: bool) -> torch.Tensor:
        n = None if unit else torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min_(1e-12)
        u = z if n is None else z / n
        logits = _scaled_bmm(u, u.mT, 1.0 / tau)
        if centre:  # softmax(P L P) = softmax(P L): P's right side only moves each row by a constant
            logits.sub_(logits.mean(-1).unsqueeze(-2))  # L symmetric: column j's mean is row j's
        p_z = torch.softmax(logits, dim=-1)
        del logits
        m = torch.lerp(p_x, p_z, 0.5)
        if reference:  # 1/2 sum_j M (2 log M - log P_Z - log P_X) = 1/2 sum_j M a, a = log (M + e)^2 / (P_Z + e)(P_X + e):
            # one log of a ratio (a log costs a CPU ~10 passes of a product, and it is the more accurate form)
            pz_e = p_z + EPS_LOG
            ratio = p_z / pz_e  # P_Z / (P_Z + e)
            a = (m + EPS_LOG).square_().div_(pz_e.mul_(px_e)).log_()
            del pz_e
            rows = (m * a).sum(-1)
        else:  # 1/2 [KL(P_X || M) + KL(P_Z || M)]; its gradient needs a = log P_Z - log M
            log_px = torch.log(px_e)
            log_pz = (p_z + EPS_LOG).log_()
            log_m = (m + EPS_LOG).log_()
            rows = (p_x * log_px).sum(-1) + (p_z * log_pz).sum(-1) - 2.0 * (m * log_m).sum(-1)
            a, m, ratio = log_pz.sub_(log_m), None, None
        ctx.save_for_backward(u, n, p_z, a, m, ratio)
        ctx.tau, ctx.centre = tau, centre
        return 0.5 * rows.mean(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        u, n, p_z, a, m, ratio = ctx.saved_tensors
        if m is None:  # P_Z (d rows / d P_Z): a
            g = p_z * a
        else:  # P_Z a / 2 + P_Z M / (M + e) - M P_Z / (P_Z + e), the last two as (P_Z - M) P_Z / (P_Z + e): both are
            # near P_Z where P_Z is near 1, and taken apart they would cost the softmax's backward its precision
            g = torch.sub(p_z, m).mul_(ratio).addcmul_(p_z, a, value=0.5)
        g.addcmul_(p_z, g.sum(-1, keepdim=True), value=-1.0)  # the softmax's backward: rows summing to 0
        k = (0.5 / p_z.shape[-1]) * grad.view(-1, 1, 1)  # the mean over rows, the halving
        if ctx.centre:  # P (G + G^T) P = P G + (P G)^T for G of zero row sums, P G = G less its column means
            g = torch.addcmul(g.mean(-2, keepdim=True).mul_(-k), g, k)
        else:
            g.mul_(k)
        g = torch.add(g, g.mT)  # the logits' gradient, symmetric (a strided read costs less than a transposed copy)
        gu = _scaled_bmm(g, u, 1.0 / ctx.tau)
        if n is not None:  # the normalisation's backward
            gu = gu.addcmul_(u, (u * gu).sum(-1, keepdim=True), value=-1.0).div_(n)
        return gu, None, None, None, None, None, None


def frozen_affinity(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen side's row-softmax P_X and P_X + 1e-12 from its logits X~ X~^T / tau (what
    `structure_regularizer_given` takes: the reference JS form needs no log of P_X of its own)."""
    p_x = torch.softmax(logits.float(), dim=-1)
    return p_x, p_x + EPS_LOG


@float32
def structure_regularizer_given(p_x: torch.Tensor, px_e: torch.Tensor, z: torch.Tensor, tau: float = 0.05,
                                centering: str = "mean", js: str = "reference", unit: bool = False) -> torch.Tensor:
    """R_S at level 1 of S runs' stacked outputs z (S, b, d) against the frozen side's affinities P_X and
    P_X + 1e-12 (S, b, b) given (`frozen_affinity`: the trainer takes them from one Gram matrix of the training
    rows, once per distinct batch). `structure_regularizer(x, z)` at levels=1 up to float rounding, in float32.
    unit: z's rows are already of norm 1 in float32 (the lean step's heads: train.stacked), not normalised again."""
    _check_options(1, "none", centering, js, tau)
    if z.ndim != 3 or p_x.shape != (*z.shape[:2], z.shape[1]) or px_e.shape != p_x.shape:
        raise StratalignError(f"structure_regularizer_given: need z (S, b, d) and affinities (S, b, b), got "
                              f"{tuple(z.shape)} and {tuple(p_x.shape)}")
    return _StructureGiven.apply(z.float(), p_x.float(), px_e.float(), float(tau), centering == "mean",
                                 js == "reference", bool(unit and z.dtype == torch.float32))
