"""FuseMix latent mixup (METHOD.md 3.9): one m and one permutation shared by both modalities, per-run seeded
draws, runs without mixup untouched; the knob is refused where there is no batch of aligned heads to mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core.mixup import LatentMixup, latent_mixup, mix_runs
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig


def test_one_m_and_one_permutation_for_both_modalities() -> None:
    x, y = torch.arange(12.0).view(4, 3), 100 + torch.arange(8.0).view(4, 2)
    perm = torch.tensor([2, 0, 3, 1])
    xm, ym = latent_mixup(x, y, 0.25, perm)
    assert torch.equal(xm, 0.25 * x + 0.75 * x[perm]) and torch.equal(ym, 0.25 * y + 0.75 * y[perm])
    assert torch.equal(latent_mixup(x, y, 1.0, perm)[0], x)


def test_mix_runs_mixes_only_runs_with_a_mixer_and_is_seeded() -> None:
    a, t = torch.randn(3, 16, 5), torch.randn(3, 16, 4)
    assert mix_runs(a, t, [None, None, None]) == (a, t)  # nothing asked: the same tensors
    ma, mt = mix_runs(a, t, [None, LatentMixup(1.0, seed=7), None])
    assert torch.equal(ma[0], a[0]) and torch.equal(ma[2], a[2]) and torch.equal(mt[2], t[2])
    assert not torch.equal(ma[1], a[1])
    m, perm = LatentMixup(1.0, seed=7).draw(16)  # the same draw again from the same seed
    want = latent_mixup(a[1], t[1], m, torch.from_numpy(perm))
    assert torch.equal(ma[1], want[0]) and torch.equal(mt[1], want[1])
    draws = [LatentMixup(2.0, seed=s).draw(8)[0] for s in range(200)]
    assert 0 < min(draws) and max(draws) < 1 and abs(np.mean(draws) - 0.5) < 0.05  # Beta(2, 2)
    with pytest.raises(StratalignError, match="alpha must be > 0"):
        LatentMixup(0.0, 0)


@pytest.mark.parametrize("objective,head", [("comm", "linear"), ("csa", "csa"), ("asif", "asif"),
                                            ("clip+structure-knn", "linear")])
def test_mixup_refused_without_batches_of_heads_to_mix(objective, head) -> None:
    with pytest.raises(StratalignError, match="mixup_alpha \\(FuseMix\\) mixes the batches of aligned heads"):
        TrainConfig(objective=objective, head=head, mixup_alpha=1.0)
    assert TrainConfig(objective="clip+ib", mixup_alpha=1).mixup_alpha == 1.0
