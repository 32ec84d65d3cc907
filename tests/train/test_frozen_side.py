"""train.frozen_side: R_S's frozen-side logits of a stack's batches from one Gram matrix of the training rows equal
those computed from the batch (both centerings, with and without the Gram matrix), and a batch two runs share is
computed once and handed to both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stratalign.core import losses_lean
from stratalign.train import frozen_side
from stratalign.train.frozen_side import FrozenGram, FrozenSides


def _direct(table: torch.Tensor, pos: torch.Tensor, tau: float, centering: str) -> torch.Tensor:
    xh = F.normalize(table[pos], dim=-1)
    xc = xh - xh.mean(-2, keepdim=True) if centering == "mean" else xh
    return (xc / tau) @ xc.mT


@pytest.mark.parametrize("centering", ["mean", "none"])
@pytest.mark.parametrize("gram_rows, gather", [(4096, 1 << 24), (0, 1 << 24), (4096, 1), (4096, 512)])
def test_logits_from_the_gram_equal_the_batch_products(monkeypatch, centering: str, gram_rows: int,
                                                       gather: int) -> None:
    monkeypatch.setattr(frozen_side, "GRAM_ROWS", gram_rows)
    monkeypatch.setattr(frozen_side, "GATHER", gather)  # 1: the blocks gathered a run at a time; 512: 2 runs, then 1
    g = torch.Generator().manual_seed(0)
    table = torch.randn(90, 24, generator=g) * 3.0
    rows = torch.arange(10, 80)
    gram = FrozenGram(table, rows)
    assert (gram.gram is None) == (gram_rows == 0)
    pos = torch.stack([rows[torch.randperm(len(rows), generator=g)[:16]] for _ in range(3)])
    want = _direct(table, pos, 0.05, centering)
    torch.testing.assert_close(gram.logits(pos, 0.05, centering), want, rtol=1e-5, atol=2e-4)


def test_a_shared_batch_is_computed_once(monkeypatch) -> None:
    g = torch.Generator().manual_seed(1)
    xi, xt = torch.randn(50, 12, generator=g), torch.randn(50, 10, generator=g)
    sides = FrozenSides(xi, xt, [torch.arange(40)])
    a, b = torch.randperm(40, generator=g)[:8], torch.randperm(40, generator=g)[:8]
    pos = torch.stack([a, b, a, a])
    seen: list[int] = []
    real = losses_lean.frozen_affinity
    monkeypatch.setattr(frozen_side, "frozen_affinity", lambda logits: seen.append(len(logits)) or real(logits))
    image, _ = sides.sides(pos)
    p_x, px_e = image(0.05, "mean")
    assert seen == [2] and p_x.shape == (4, 8, 8)
    image(0.05, "mean")
    assert seen == [2]  # cached for the step
    want = real(_direct(xi, pos, 0.05, "mean"))
    torch.testing.assert_close(p_x, want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(px_e, want[1], rtol=1e-5, atol=1e-7)
