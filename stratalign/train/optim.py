"""The optimiser step of a stack of runs (METHOD 3.6): each run's own gradient-norm clip per head and AdamW, done for
every run's tensors at once.

- `clip_per_run`: one `_foreach_norm` over all the runs' gradients, each clip group's total norm from its tensors'
  norms, one `_foreach_mul_` by each group's factor min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_
  rule), instead of 2 x S calls of clip_grad_norm_. Every tensor's norm is taken on that tensor alone, so a run's
  clip is the same whatever runs stack beside it.
- `RunsAdamW`: AdamW through torch's fused kernel (`torch._fused_adamw_`: one call over every tensor, on the CPU
  and CUDA) on the runs' own tensors; elementwise, so a stack of S runs is S separate optimisers. It calls the
  kernel directly: torch.optim.Optimizer's constructor imports torch._dynamo (~4 s), which a run that does not
  compile does not need.
"""

from __future__ import annotations

from typing import Sequence

import torch

ClipGroups = Sequence[Sequence[torch.Tensor]]


def clip_per_run(groups: ClipGroups, max_norm: float = 1.0) -> None:
    """Scale each group's gradients (in place) so that the group's total L2 norm is at most max_norm."""
    grads = [p.grad for g in groups for p in g if p.grad is not None]
    if not grads:
        return
    sizes = [sum(p.grad is not None for p in g) for g in groups]
    norms = torch._foreach_norm(grads, 2.0)
    factors: list[torch.Tensor] = []
    start = 0
    for n in sizes:
        if n:
            total = torch.linalg.vector_norm(torch.stack(norms[start:start + n]), 2.0)
            factors += [torch.clamp(max_norm / (total + 1e-6), max=1.0)] * n
        start += n
    torch._foreach_mul_(grads, factors)


class RunsAdamW:
    """AdamW (decoupled weight decay, bias-corrected, no amsgrad) over a list of tensors, with per-tensor state that
    follows the tensors when runs leave the stack (`keep`)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float], weight_decay: float,
                 eps: float = 1e-8) -> None:
        self.lr, self.betas, self.weight_decay, self.eps = float(lr), tuple(betas), float(weight_decay), float(eps)
        self.params: list[torch.Tensor] = []
        self.state: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.keep(params)

    def keep(self, params: Sequence[torch.Tensor]) -> None:
        """Step these tensors from now on: their state is kept (new ones start fresh), the others' is dropped."""
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
        avg, sq, steps = ([self.state[p][i] for p in live] for i in range(3))
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(live, [p.grad for p in live], avg, sq, [], steps, lr=self.lr, beta1=self.betas[0],
                            beta2=self.betas[1], weight_decay=self.weight_decay, eps=self.eps, amsgrad=False,
                            maximize=False, grad_scale=None, found_inf=None)
