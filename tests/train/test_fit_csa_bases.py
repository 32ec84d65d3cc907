"""A CSA k grid over one subset decomposes once (train.fit._CsaBases): the same models as fitting each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import heads as heads_mod
from stratalign.errors import StratalignError
from stratalign.train import fit as fit_mod
from stratalign.train.config import TrainConfig


def test_a_k_grid_shares_one_decomposition_and_fits_the_same_models(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 24)).astype(np.float32), rng.normal(size=(120, 20)).astype(np.float32)
    calls = []
    real = heads_mod.csa_basis
    monkeypatch.setattr(fit_mod, "csa_basis", lambda *args: calls.append(args[2]) or real(*args))
    monkeypatch.setattr(fit_mod, "_CSA_BASES", fit_mod._CsaBases())
    for ridge in (0.1, 1.0):
        for k in (4, 8, 16):
            model, _ = fit_mod.train_csa(a, b, TrainConfig(objective="csa", head="csa", csa_k=k, csa_ridge=ridge))
            alone = heads_mod.fit_csa(a, b, dim=512, ridge=ridge, k=k)
            for mine, theirs in zip(model.state_dict().values(), alone.state_dict().values()):
                assert torch.equal(mine, theirs)
    assert calls == [0.1, 1.0]  # one decomposition per ridge
    fit_mod.train_csa(a[:-1], b[:-1], TrainConfig(objective="csa", head="csa", csa_ridge=1.0))
    assert calls == [0.1, 1.0, 1.0]  # other rows: another decomposition, never a stale one


def test_a_basis_of_another_ridge_is_refused() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    with pytest.raises(StratalignError, match="ridge"):
        heads_mod.fit_csa(None, None, ridge=1.0, basis=heads_mod.csa_basis(a, b, 0.3))

