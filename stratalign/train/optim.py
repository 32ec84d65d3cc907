"""The optimiser step of a stack of runs (METHOD 3.6): each run's own gradient-norm clip per head and AdamW, done for
every run's tensors at once.

- `clip_per_run`: one `_foreach_norm` over all the runs' gradients, each clip group's total norm from its tensors'
  norms, one `_foreach_mul_` by each group's factor min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_
  rule), instead of 2 x S calls of clip_grad_norm_. Every tensor's norm is taken on that tensor alone, so a run's
  clip is the same whatever runs stack beside it.
- `clip_stacked_per_run`: the same clip on stacked gradients in two calls a tensor (the lean step of bf16 runs).
- `RunsAdamW`: AdamW through torch's fused kernel (`torch._fused_adamw_`: one call over every tensor, on the CPU
  and CUDA) on the runs' stacked tensors; elementwise, so a stack of S runs is S separate optimisers (one step
  count per tensor: the runs of a stack start together). It calls the
  kernel directly: torch.optim.Optimizer's constructor imports torch._dynamo (~4 s), which a run that does not
  compile does not need.
"""

from __future__ import annotations

from typing import Sequence

import torch

ClipGroups = Sequence[Sequence[torch.Tensor]]


def clip_per_run(groups: ClipGroups, max_norm: float = 1.0) -> None:
    """Scale each group's gradients (in place) so that the group's total L2 norm is at most max_norm."""
    clip_grads_per_run([[p.grad for p in g if p.grad is not None] for g in groups], max_norm)


def clip_grads_per_run(groups: ClipGroups, max_norm: float = 1.0) -> None:
    """`clip_per_run` of the gradients themselves (e.g. each run's slices of stacked gradients)."""
    grads = [t for g in groups for t in g]
    if not grads:
        return
    sizes = [len(g) for g in groups]
    norms = torch._foreach_norm(grads, 2.0)
    factors: list[torch.Tensor] = []
    start = 0
    for n in sizes:
        if n:
            total = torch.linalg.vector_norm(torch.stack(norms[start:start + n]), 2.0)
            factors += [torch.clamp(max_norm / (total + 1e-6), max=1.0)] * n
        start += n
    torch._foreach_mul_(grads, factors)


def clip_stacked_per_run(groups: ClipGroups, max_norm: float = 1.0) -> None:
    """`clip_grads_per_run` of stacked gradients, dim 0 indexing runs: each group (one head's gradients) is clipped
    run by run, each run's norm over its slices of the group's tensors, in two calls a tensor whatever the number of
    runs (the lean step; the norms may round otherwise than `clip_grads_per_run`'s, which fp32 runs keep)."""
    for grads in groups:
        if not grads:
            continue
        sq = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), 2.0, dim=1) for g in grads]).square_().sum(0)
        factor = torch.clamp(max_norm / (sq.sqrt_() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, *([1] * (g.ndim - 1))))


class RunsAdamW:
    """AdamW (decoupled weight decay, bias-corrected, no amsgrad) over a list of tensors, with per-tensor state that
    follows the tensors when runs leave the stack (`keep`)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float], weight_decay: float,
                 eps: float = 1e-8, stacked: bool = False) -> None:
        self.lr, self.betas, self.weight_decay, self.eps = float(lr), tuple(betas), float(weight_decay), float(eps)
        self.stacked = stacked  # dim 0 of every tensor indexes runs
        self.params: list[torch.Tensor] = []
        self.state: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.keep(params)

    def keep(self, params: Sequence[torch.Tensor], rows: Sequence[int] | None = None) -> None:
        """Step these tensors from now on: their state is kept (new ones start fresh), the others' is dropped. With
        `rows`: `params` replace the current tensors one for one, holding their rows `rows` (the runs a stack keeps),
        and the state's rows follow."""
        if rows is not None:
            old = [self.state[p] for p in self.params]
            self.params = list(params)
            self.state = {}
            for p, (avg, sq, steps) in zip(self.params, old):
                index = torch.tensor(list(rows), dtype=torch.long, device=avg.device)
                self.state[p] = (avg.index_select(0, index), sq.index_select(0, index), steps)
            return
        self.params = list(params)
        self.state = {p: self.state.get(p) or (torch.zeros_like(p), torch.zeros_like(p),
                                                torch.zeros((), dtype=torch.float32, device=p.device))
                      for p in self.params}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of every tensor that has a gradient, at the current `lr`."""
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return
        torch._foreach_add_([self.state[p][2] for p in live], 1)
        params, grads, avg, sq, steps = [], [], [], [], []
        for p in live:
            a, q, k = self.state[p]
            # the kernel takes whole vectors, then a scalar tail that may round otherwise: a run whose slice is not
            # a whole number of vectors (a residual head's gate) steps on its own slice, as it does alone
            pieces = range(len(p)) if self.stacked and p[0].numel() % 64 else [None]
            for s in pieces:
                params.append(p if s is None else p[s])
                grads.append(p.grad if s is None else p.grad[s])
                avg.append(a if s is None else a[s])
                sq.append(q if s is None else q[s])
                steps.append(k)
        torch._fused_adamw_(params, grads, avg, sq, [], steps, lr=self.lr, beta1=self.betas[0],
                            beta2=self.betas[1], weight_decay=self.weight_decay, eps=self.eps, amsgrad=False,
                            maximize=False, grad_scale=None, found_inf=None)
