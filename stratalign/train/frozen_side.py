"""R_S's frozen side for a stack of runs, in the lean step of bf16 runs (issue 30): the frozen inputs never change,
so their affinities come from one Gram matrix of the normalised training rows (per modality and group), indexed by
each batch's rows, and are computed once per distinct batch (runs of one seed and training subset, e.g. the grid
points of a tuned cell, draw the same batches).

X~ X~^T over a batch, X~ the rows normalised and then centred on the batch mean, is G[B, B] - r 1^T - 1 r^T + mean(r),
r the row means of G[B, B]: one rank-2 update of the gathered block. fp32 runs keep computing it from the batch
(their numbers stay what they were); this equals it up to float rounding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from stratalign.core.losses import _normalise_centre
from stratalign.core.losses_lean import frozen_affinity

# a Gram matrix over more training rows than this is not kept: the affinities are then computed from each batch (and
# its flat indices fit an int32)
GRAM_ROWS = 4096
# elements of the stack's Gram blocks gathered at once (16 MB of int32 indices)
GATHER = 1 << 22
# (tau, centering) -> P_X and P_X + 1e-12 of a stack's batches, (S, b, b) each
FrozenSide = Callable[[float, str], tuple[torch.Tensor, torch.Tensor]]


class FrozenGram:
    """The Gram matrix of one modality's normalised training rows (the union over a group's runs)."""

    def __init__(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        self.table = table
        rows = torch.unique(rows)
        self.gram: torch.Tensor | None = None
        if len(rows) <= GRAM_ROWS:
            with torch.autocast(device_type=table.device.type, enabled=False):
                xh = F.normalize(table[rows].float(), dim=-1)
                self.gram = xh @ xh.T
            self.lookup = torch.full((len(table),), -1, dtype=torch.long, device=table.device)
            self.lookup[rows] = torch.arange(len(rows), device=table.device)

    def _blocks(self, g: torch.Tensor) -> torch.Tensor:
        """gram[g_s][:, g_s] for each row g_s of g (S, b): one gather from the flattened Gram matrix by the int32 flat
        indices g_si * n + g_sj (a gather of the rows and then each run's columns took ~1.6x as long on a CPU), the
        runs taken GATHER elements at a time (the indices' memory)."""
        assert self.gram is not None
        S, b = g.shape
        n = self.gram.shape[1]
        flat = self.gram.view(-1)
        out = torch.empty(S, b, b, dtype=self.gram.dtype, device=self.gram.device)
        step = max(1, min(S, GATHER // (b * b)))
        for start in range(0, S, step):
            c = g[start:start + step].to(torch.int32)
            index = (c.unsqueeze(-1) * n + c.unsqueeze(-2)).view(-1)
            torch.index_select(flat, 0, index, out=out[start:start + step].view(-1))
        return out

    def logits(self, pos: torch.Tensor, tau: float, centering: str) -> torch.Tensor:
        """X~ X~^T / tau of the batches `pos` (S, b) of table rows, in float32."""
        with torch.autocast(device_type=self.table.device.type, enabled=False):
            if self.gram is None:  # from the batch, as core.losses does
                xc, _ = _normalise_centre(self.table[pos], centering)
                return torch.bmm(xc / tau, xc.mT)
            block = self._blocks(self.lookup[pos])
            if centering != "mean":
                return block.div_(tau)
            r = block.mean(-1)
            a = 0.5 * r.mean(-1, keepdim=True) - r  # x~_i . x~_j = G_ij + a_i + a_j
            ones = torch.ones_like(a)
            return torch.baddbmm(block, torch.stack([a, ones], -1), torch.stack([ones, a], -2), beta=1 / tau,
                                 alpha=1 / tau)


def frozen_side(gram: FrozenGram, pos: torch.Tensor,
                unique: tuple[torch.Tensor, torch.Tensor] | None = None) -> FrozenSide:
    """The affinities of the stack's batches `pos` (S, b), computed on first use for each (tau, centering), once per
    distinct batch (`unique`: torch.unique(pos, dim=0, return_inverse=True) when the caller has it)."""
    distinct, inverse = torch.unique(pos, dim=0, return_inverse=True) if unique is None else unique
    cache: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def affinities(tau: float, centering: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (tau, centering) not in cache:
            p_x, px_e = frozen_affinity(gram.logits(distinct, tau, centering))
            if len(distinct) < len(pos):
                p_x, px_e = p_x[inverse], px_e[inverse]
            cache[(tau, centering)] = (p_x, px_e)
        return cache[(tau, centering)]

    return affinities


class FrozenSides:
    """Both modalities' Gram matrices over a group's training rows (built on first use) and the frozen sides of its
    stacked batches."""

    def __init__(self, xi: torch.Tensor, xt: torch.Tensor, rows: Sequence[torch.Tensor]) -> None:
        self.tables, self.rows = (xi, xt), rows
        self.grams: tuple[FrozenGram, FrozenGram] | None = None

    def sides(self, pos: torch.Tensor) -> tuple[FrozenSide, FrozenSide]:
        """The image and text frozen sides of the batches `pos` (S, b) of table rows."""
        if self.grams is None:
            rows = torch.cat(list(self.rows))
            self.grams = (FrozenGram(self.tables[0], rows), FrozenGram(self.tables[1], rows))
        unique = torch.unique(pos, dim=0, return_inverse=True)  # (distinct batches, each run's), for both sides
        return frozen_side(self.grams[0], pos, unique), frozen_side(self.grams[1], pos, unique)
