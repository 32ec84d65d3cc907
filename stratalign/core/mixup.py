"""FuseMix latent mixup (Vouitsis et al., CVPR 2024; METHOD.md section 3.9).

The frozen inputs of a training batch are mixed before the heads see them: x' = m x + (1 - m) x[j] and
y' = m y + (1 - m) y[j], with ONE m ~ Beta(alpha, alpha) and ONE permutation j of the batch shared by both
modalities, so mixed image i still pairs with mixed caption i and the CLIP loss is taken on the mixed pairs.
Each run draws from its own seeded generator, apart from its dropout and VIB noise, so a run without mixup
trains bit for bit as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stratalign.errors import StratalignError

FUSEMIX_ALPHA = 1.0  # METHOD 3.9
_STREAM = 0x6D697875  # a seed word of the mixup stream ("mixu"), apart from every other seeded draw


class LatentMixup:
    """One run's mixup: alpha and its own generator of (m, permutation) draws, seeded by the run's seed."""

    def __init__(self, alpha: float, seed: int) -> None:
        if not float(alpha) > 0:
            raise StratalignError(f"mixup alpha must be > 0, not {alpha!r}")
        self.alpha = float(alpha)
        self.rng = np.random.default_rng([int(seed), _STREAM])

    def draw(self, b: int) -> tuple[float, np.ndarray]:
        """(m, permutation of the b rows) for one batch."""
        return float(self.rng.beta(self.alpha, self.alpha)), self.rng.permutation(b)


def latent_mixup(x: torch.Tensor, y: torch.Tensor, m: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed pairs (m x + (1 - m) x[perm], m y + (1 - m) y[perm]) of one batch (rows of x pair rows of y)."""
    return m * x + (1.0 - m) * x[perm], m * y + (1.0 - m) * y[perm]


def mix_runs(a: torch.Tensor, t: torch.Tensor, mixers: Sequence[LatentMixup | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked batches (S, b, d) of S runs, each run's slice mixed by its own mixer (None: left as it is).
    Without any mixer the inputs come back untouched (the same tensors)."""
    if all(mx is None for mx in mixers):
        return a, t
    out_a, out_t = [], []
    for s, mx in enumerate(mixers):
        if mx is None:
            out_a.append(a[s])
            out_t.append(t[s])
            continue
        m, perm = mx.draw(a.shape[1])
        xa, xt = latent_mixup(a[s], t[s], m, torch.from_numpy(perm).to(a.device))
        out_a.append(xa)
        out_t.append(xt)
    return torch.stack(out_a), torch.stack(out_t)
