"""The heads of S runs as stacked tensors: one batched matmul per layer instead of S small ones.

The runs' parameters are kept stacked per name (`linear.weight`, `net.3.bias`, `gate`, ...) in one (S, *shape)
tensor, run s's head being slice s. The forward of a slice computes what the run's own `nn.Module` does
(`baddbmm(bias, x, W^T)` for each Linear, GELU and the L2 normalisation row-wise), and dropout draws each run's
mask from that run's own generator, so a run consumes the same random stream in a stack as alone. The head kinds
are those of stratalign.core.heads (linear, mlp, residual; the variational wrapper of each).

The lean step of bf16 runs (`StackedSide.forward_lean`) computes the same forward with its backwards written out:
each Linear casts its weight to bf16 as it lies (no transposed copy) and takes its weight gradient as g^T x in the
weight's own layout (autocast casts the transposed view and hands back a transposed gradient, whose copies cost
more than the head's products on a CPU); the rows are L2-normalised in float32, where the losses take them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stratalign.core.objectives import Side

Gens = Sequence[torch.Generator] | None


def _linear(p: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """x (S, b, d_in) through the stacked Linear `name` -> (S, b, d_out)."""
    return torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), x, p[f"{name}.weight"].transpose(1, 2))


class _Bf16Linear(torch.autograd.Function):
    """x (S, b, d_in) bf16 through stacked float32 weights (S, d_out, d_in) and biases (S, d_out), the product in
    bf16; the weight's gradient g^T x in bf16 (as autocast's), the bias's summed in float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = weight.to(torch.bfloat16)
        ctx.save_for_backward(x, w)
        return torch.baddbmm(bias.to(torch.bfloat16).unsqueeze(1), x, w.mT)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = g.to(torch.bfloat16).contiguous()
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        return gx, torch.bmm(g.mT, x).float(), g.sum(1, dtype=torch.float32)


def _linear_lean(p: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """`_linear` of the lean step: x in bf16 (see the module docstring)."""
    return _Bf16Linear.apply(x.to(torch.bfloat16), p[f"{name}.weight"], p[f"{name}.bias"])


class _UnitRows(torch.autograd.Function):
    """F.normalize(h.float(), dim=-1) with its backward in one projection, handed back in h's dtype (rows of norm
    above 1e-12, as a head's outputs are)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = h.float()
        n = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min_(1e-12)
        z = z.div_(n) if z is not h else z / n
        ctx.save_for_backward(z, n)
        ctx.dtype = h.dtype
        return z

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        z, n = ctx.saved_tensors
        dot = (z * g).sum(-1, keepdim=True)  # (linalg.vecdot takes twice as long on a CPU)
        # in float32 in place, then rounded once into h's dtype: a division writing bf16 through `out=` took ~6x as
        # long on a CPU (a mixed-dtype loop), ~5 % of the whole S = 8 step
        return torch.addcmul(g, z, dot, value=-1.0).div_(n).to(ctx.dtype)


def _dropout(x: torch.Tensor, rate: float, gens: Gens) -> torch.Tensor:
    """Dropout of each run's slice with its own generator (no-op when gens is None: evaluation)."""
    if gens is None or rate == 0.0:
        return x
    keep = torch.empty_like(x)
    for s, g in enumerate(gens):
        keep[s].bernoulli_(1.0 - rate, generator=g)
    return x * keep.div_(1.0 - rate)


Linear = Callable[[dict[str, torch.Tensor], str, torch.Tensor], torch.Tensor]


def _features_linear(p: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor, gens: Gens,
                     linear: Linear = _linear) -> torch.Tensor:
    return linear(p, "linear", x)


def _features_mlp(p: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor, gens: Gens,
                  linear: Linear = _linear) -> torch.Tensor:
    h = linear(p, "net.0", x)
    for i in range(1, int(cfg["layers"])):  # Sequential: Linear, then (GELU, Dropout, Linear) per extra layer
        h = linear(p, f"net.{3 * i}", _dropout(F.gelu(h), float(cfg["dropout"]), gens))
    return h


def _features_residual(p: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor, gens: Gens,
                       linear: Linear = _linear) -> torch.Tensor:
    branch = linear(p, "up", _dropout(F.gelu(linear(p, "down", x)), float(cfg["dropout"]), gens))
    # the gate broadcast over the width first: its gradient is then a sum over rows, then one over the width, in the
    # same order for any number of runs (a (S,)-shaped sum over rows x width is split across threads when S = 1 and
    # not when S > 1: a run alone and in a stack differed by ~1e-5 in the gate's gradient)
    gate = p["gate"].view(-1, 1, 1).expand(-1, 1, branch.shape[-1])
    return linear(p, "proj", x) + gate * branch


_FEATURES = {"linear": _features_linear, "mlp": _features_mlp, "residual": _features_residual}


class StackedSide:
    """One modality's heads of S runs (same kind and config), kept stacked: one (S, *shape) leaf tensor per parameter
    (`weights`, under state-dict names), run s's head being slice s. The batched forward uses the leaves as they are
    (nothing is stacked per step); a run's gradient, gradient clip and AdamW state are its slices (AdamW is
    elementwise, the clip takes each slice's norm alone), so a run steps as it does alone."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        cfg = dict(heads[0].config)
        self.variational = bool(cfg.pop("variational", False))
        self.d_out = int(cfg["d_out"])
        self.cfg = cfg
        self.prefix = "base." if self.variational else ""
        per_run = [dict(h.named_parameters()) for h in heads]
        self.weights = {n: torch.stack([p[n].detach() for p in per_run]).requires_grad_() for n in per_run[0]}

    def stacked(self, runs: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The (S, *shape) stack of every parameter (of the runs `runs`, in that order, when given)."""
        k = len(self.prefix)
        if runs is None:
            return {n[k:]: w for n, w in self.weights.items()}
        index = torch.tensor(list(runs), dtype=torch.long, device=next(iter(self.weights.values())).device)
        return {n[k:]: w.index_select(0, index) for n, w in self.weights.items()}

    def raw(self, x: torch.Tensor, gens: Gens, runs: Sequence[int] | None = None) -> torch.Tensor:
        """The heads' raw outputs (before normalisation) for x (S, b, d_in); `runs` picks some of the runs."""
        return _FEATURES[self.cfg["kind"]](self.stacked(runs), self.cfg, x, gens)

    def forward(self, x: torch.Tensor, gens: Gens) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training output: normalised rows, or (mu, logvar = tanh(.)) for variational heads."""
        h = self.raw(x, gens)
        if self.variational:
            return h[..., : self.d_out], torch.tanh(h[..., self.d_out:])
        return F.normalize(h, dim=-1)

    def forward_lean(self, x: torch.Tensor, gens: Gens) -> torch.Tensor:
        """`forward` of the lean step (module docstring; not for variational heads): float32 unit rows."""
        return _UnitRows.apply(_FEATURES[self.cfg["kind"]](self.stacked(), self.cfg, x, gens, linear=_linear_lean))

    def embed(self, x: torch.Tensor, runs: Sequence[int] | None = None) -> torch.Tensor:
        """Evaluation embedding (no dropout): normalised output, or normalise(mu) for variational heads."""
        h = self.raw(x, None, runs)
        return F.normalize(h[..., : self.d_out] if self.variational else h, dim=-1)

    def one(self, s: int, gen: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Run s's head as a function of 2-D inputs (training mode: its dropout draws from `gen`); what the kNN
        form of R_S calls on a run's neighbour table."""
        def head(x: torch.Tensor) -> torch.Tensor:
            h = self.raw(x.unsqueeze(0), None if gen is None else [gen], [s])[0]
            return F.normalize(h, dim=-1)

        return head

    def tensors(self) -> list[torch.Tensor]:
        """The stacked leaves (what the optimiser steps)."""
        return list(self.weights.values())

    def grads(self, s: int) -> list[torch.Tensor]:
        """Run s's slices of the gradients (views: what its gradient clip scales)."""
        return [w.grad[s] for w in self.weights.values() if w.grad is not None]

    def state(self, s: int) -> dict[str, torch.Tensor]:
        """Run s's head weights under their state-dict names (a detached copy)."""
        return {n: w[s].detach().clone() for n, w in self.weights.items()}

    def keep(self, runs: Sequence[int]) -> None:
        """Keep only the runs `runs` (stopped runs leave the stack): new leaves of their slices."""
        index = torch.tensor(list(runs), dtype=torch.long, device=next(iter(self.weights.values())).device)
        self.weights = {n: w.detach().index_select(0, index).requires_grad_() for n, w in self.weights.items()}


def canonical_grad(z: torch.Tensor) -> torch.Tensor:
    """z, whose gradient reaches the heads in one memory layout whatever produced it. The CLIP loss alone hands
    back a gradient laid out by its matmul's backward; with a regulariser the gradient is a sum, laid out afresh;
    the heads' backward matmuls round differently on the two layouts (~1e-8), which made a run differ with and
    without a regulariser of weight 0 and between stacks. A contiguous copy makes the layout one."""
    if z.requires_grad:
        z.register_hook(lambda g: g.contiguous())
    return z


def slice_side(side: Side, a: int, b: int) -> Side:
    """Runs a..b-1 of a stacked side (views)."""
    whole = side.frozen

    def frozen(tau: float, centering: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert whole is not None
        p_x, px_e = whole(tau, centering)
        return p_x[a:b], px_e[a:b]

    if a == 0 and b == len(side.z):  # the whole stack: no slice (its backward would write zeros and copy)
        return side
    return Side(side.x[a:b], side.z[a:b], None if side.mu is None else side.mu[a:b],
                None if side.logvar is None else side.logvar[a:b], frozen=None if whole is None else frozen,
                unit=side.unit)
