"""Closed-form baselines (METHOD.md 3.9): Procrustes recovers a known rotation; ASIF retrieves on a toy where a
shared latent makes relative representations agree; both rebuild from their config and saved tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core.baselines import ASIFSide, fit_asif, fit_procrustes
from stratalign.core.heads import AlignedHeads, build_head, build_model
from stratalign.errors import StratalignError


def _rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _r_at_1(zi: torch.Tensor, zt: torch.Tensor) -> float:
    hits = (zi @ zt.T).argmax(1) == torch.arange(len(zi))
    return float(hits.float().mean())


def _r_at_10(zi: torch.Tensor, zt: torch.Tensor) -> float:
    """Image-to-text recall at 10, in percent."""
    top = (zi @ zt.T).topk(10, dim=1).indices
    return 100 * float((top == torch.arange(len(zi))[:, None]).any(1).float().mean())


def test_procrustes_recovers_a_known_rotation() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16)) * np.linspace(3, 0.5, 16)  # distinct principal axes
    q = _rotation(16, 1)
    image, text = fit_procrustes(a, a @ q, dim=512)
    assert image.config == {"kind": "procrustes", "d_in": 16, "d_out": 16}
    wa, wb = image.weight.detach().double().numpy(), text.weight.detach().double().numpy()
    np.testing.assert_allclose(wa @ wb.T, q, atol=1e-5)  # image -> shared -> text space is the rotation
    held = torch.from_numpy(rng.normal(size=(50, 16)) * np.linspace(3, 0.5, 16)).float()
    zi, zt = image(held), text(held @ torch.from_numpy(q).float())
    assert torch.allclose(zi, zt, atol=1e-4) and _r_at_1(zi, zt) == 1.0


def test_procrustes_pca_to_the_smaller_width_and_noise() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 6))
    a = z @ rng.normal(size=(6, 24)) + 0.05 * rng.normal(size=(400, 24))
    b = z @ rng.normal(size=(6, 10)) + 0.05 * rng.normal(size=(400, 10))
    image, text = fit_procrustes(a[:300], b[:300], dim=512)
    assert image.config["d_out"] == text.config["d_out"] == 10 and image.config["d_in"] == 24
    zi, zt = image(torch.from_numpy(a[300:]).float()), text(torch.from_numpy(b[300:]).float())
    assert _r_at_1(zi, zt) > 0.2  # 100 held-out pairs: chance is 0.01
    assert fit_procrustes(a[:300], b[:300], dim=4)[0].config["d_out"] == 4
    with pytest.raises(StratalignError, match="procrustes needs paired 2-D arrays"):
        fit_procrustes(a[:10], b[:9])


def _latent_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and captions of 20 concepts through different nonlinear maps: no linear map is shared, but the
    two sides agree on which training pairs each row is near."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 8))
    z = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, 8))
    img = np.tanh(z @ rng.normal(size=(8, 32))) + 0.1 * rng.normal(size=(n, 32))
    txt = (z @ rng.normal(size=(8, 24))) ** 3 / 10 + 0.1 * rng.normal(size=(n, 24))
    return img, txt


def test_asif_retrieves_with_no_training() -> None:
    img, txt = _latent_pairs(700)
    image, text = fit_asif(img[:600], txt[:600])  # default k = 800 > 600 anchors: every anchor kept
    assert image.config == {"kind": "asif", "d_in": 32, "d_out": 600, "topk": 800, "power": 8.0}
    assert image.topk == 600
    qi, qt = torch.from_numpy(img[600:]).float(), torch.from_numpy(txt[600:]).float()
    zi, zt = image(qi), text(qt)
    same = _r_at_10(zi, zt)
    assert same > 50  # chance: 10 %; rows of one concept are interchangeable
    # the anchors are what aligns: with anchors out of order, retrieval falls to chance
    shuffled, _ = fit_asif(img[:600][np.random.default_rng(1).permutation(600)], txt[:600])
    worse = _r_at_10(shuffled(qi), zt)
    assert worse < same - 30


def test_asif_keeps_top_k_positive_powers_unit_rows() -> None:
    img, txt = _latent_pairs(200, seed=3)
    side = fit_asif(img[:150], txt[:150], topk=10, power=4.0)[0]
    z = side(torch.from_numpy(img[150:]).float())
    assert ((z > 0).sum(1) <= 10).all() and (z >= 0).all()
    np.testing.assert_allclose(z.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    cos = torch.nn.functional.normalize(torch.from_numpy(img[150:]).float(), dim=1) @ side.anchors.T
    top = cos.topk(10, dim=1)
    want = torch.zeros_like(cos).scatter_(1, top.indices, top.values.clamp_min(0) ** 4)
    assert torch.allclose(z, torch.nn.functional.normalize(want, dim=1), atol=1e-6)
    with pytest.raises(StratalignError, match="power must be > 0"):
        ASIFSide(4, 5, 2, 0.0)


def test_asif_centring_takes_cosines_around_the_anchors_mean() -> None:
    """Anisotropic rows (a large shared offset: every cosine near 1) flatten plain ASIF; centred ASIF sees the
    structure under the offset."""
    img, txt = _latent_pairs(700, seed=5)
    img = img + 8.0  # one direction dominates every image row
    qi, qt = torch.from_numpy(img[600:]).float(), torch.from_numpy(txt[600:]).float()
    plain = fit_asif(img[:600], txt[:600])  # every anchor kept (k = 800 > 600)
    centred = fit_asif(img[:600], txt[:600], center=True)
    assert centred[0].config["center"] is True and "center" not in plain[0].config
    unit = img[:600] / np.linalg.norm(img[:600], axis=1, keepdims=True)
    np.testing.assert_allclose(centred[0].mean.numpy(), unit.mean(0), rtol=1e-5)
    assert _r_at_10(centred[0](qi), centred[1](qt)) > 90 and _r_at_10(plain[0](qi), plain[1](qt)) < 30  # chance: 10


@pytest.mark.parametrize("fit", [lambda a, b: fit_procrustes(a, b), lambda a, b: fit_asif(a, b, topk=7),
                                 lambda a, b: fit_asif(a, b, center=True)], ids=["procrustes", "asif", "asif-centred"])
def test_rebuilt_from_config_and_tensors(fit) -> None:
    img, txt = _latent_pairs(80, seed=4)
    model = AlignedHeads(*fit(img, txt))
    again = build_model(model.config)
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.from_numpy(img[:5]).float()
    assert torch.equal(again.image(x), model.image(x))
    assert not any(p.requires_grad for p in model.parameters()) and len(list(model.parameters())) > 0
    with pytest.raises(StratalignError, match="has no variational variant"):
        build_head(model.config["image"]["kind"], 4, 5, variational=True)
