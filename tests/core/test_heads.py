"""Heads: shapes, normalised outputs, a gate that learns, config round trips, CSA on planted data and against a
direct implementation of the paper's weighted_corr_sim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core.heads import (
    CSA,
    LinearHead,
    MLPHead,
    ResidualLowRankHead,
    VariationalHead,
    build_head,
    build_model,
    fit_csa,
)
from stratalign.core.losses import clip_loss
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig, embed, model_from_tensors, model_tensors, refine_csa


@pytest.mark.parametrize("kind,opts", [("linear", {}), ("mlp", {"hidden": 32, "layers": 3, "dropout": 0.1}),
                                       ("residual", {"rank": 4, "dropout": 0.0})])
def test_heads_normalised_and_rebuilt_from_config(kind, opts):
    torch.manual_seed(0)
    head = build_head(kind, 12, 8, **opts).eval()
    x = torch.randn(5, 12)
    z = head(x)
    assert z.shape == (5, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    clone = build_head(**head.config)
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone.eval()(x), z)


def test_mlp_layer_structure():
    head = MLPHead(10, 6, hidden=16, layers=3, dropout=0.2)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert head.net[0].in_features == 10 and head.net[-1].out_features == 6
    assert [type(m).__name__ for m in MLPHead(10, 6, layers=1).net] == ["Linear"]
    assert LinearHead(10).linear.out_features == 512 and LinearHead(10).linear.bias is not None


def test_residual_gate_learns():
    torch.manual_seed(0)
    hi, ht = ResidualLowRankHead(16, 8, rank=4, dropout=0.0), ResidualLowRankHead(16, 8, rank=4, dropout=0.0)
    xi, xt = torch.randn(32, 16), torch.randn(32, 16)
    clip_loss(hi(xi), ht(xt)).backward()
    assert hi.gate.grad is not None and abs(float(hi.gate.grad)) > 0
    assert hi.up.weight.grad.abs().sum() > 0 and hi.down.weight.grad.abs().sum() > 0
    g0 = float(hi.gate.detach())
    opt = torch.optim.AdamW(list(hi.parameters()) + list(ht.parameters()), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        clip_loss(hi(xi), ht(xt)).backward()
        opt.step()
    assert abs(float(hi.gate.detach()) - g0) > 1e-3


def test_variational_head():
    torch.manual_seed(0)
    head = build_head("mlp", 12, 6, hidden=16, variational=True)
    assert isinstance(head, VariationalHead)
    mu, logvar = head(torch.randn(4, 12) * 100)
    assert mu.shape == logvar.shape == (4, 6)
    assert logvar.abs().max() <= 1.0
    z = head.embed(torch.randn(4, 12))
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert head.config["variational"] and head.config["d_out"] == 6
    clone = build_head(**head.config)
    assert clone.base.net[-1].out_features == 12


def test_bad_head_input():
    with pytest.raises(StratalignError, match="unknown head kind"):
        build_head("transformer", 4, 4)
    with pytest.raises(StratalignError, match="bad option"):
        build_head("linear", 4, 4, rank=3)
    with pytest.raises(StratalignError, match="d_in"):
        LinearHead(0, 4)
    with pytest.raises(StratalignError, match="dropout"):
        MLPHead(4, 4, dropout=1.5)


def _planted(n=800, d_shared=4, d_img=20, d_txt=14, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, d_shared))
    xi = s @ rng.standard_normal((d_shared, d_img)) + rng.standard_normal((n, d_img))
    xt = s @ rng.standard_normal((d_shared, d_txt)) + rng.standard_normal((n, d_txt))
    return xi.astype(np.float32) + 3.0, xt.astype(np.float32) - 2.0


def test_csa_recovers_planted_subspace():
    xi, xt = _planted()
    model = fit_csa(xi[:600], xt[:600], dim=4, ridge=1e-3)
    assert isinstance(model, CSA)
    ci = embed(model, xi[600:], "image")
    ct = embed(model, xt[600:], "text")
    assert torch.allclose(ci.norm(dim=1), torch.ones(200), atol=1e-5)
    # held-out canonical variates (before weighting and normalisation) are strongly correlated per direction
    with torch.no_grad():
        ui = model.image.variates(torch.from_numpy(xi[600:])).numpy()
        ut = model.text.variates(torch.from_numpy(xt[600:])).numpy()
    corr = [np.corrcoef(ui[:, j], ut[:, j])[0, 1] for j in range(4)]
    assert min(corr) > 0.75, corr
    assert float(model.correlations[0]) > 0.9
    # and paired rows are far more similar than random rows
    assert float((ci * ct).sum(1).mean()) > 0.6
    assert abs(float((ci * ct.roll(1, 0)).sum(1).mean())) < 0.2


def test_csa_caps_dim_and_round_trips_as_tensors():
    xi, xt = _planted(n=100)
    model = fit_csa(xi, xt, dim=512, ridge=1e-2, k=0)
    assert model.correlations.numel() == 14 and model.image.config["d_out"] == 14 + 2  # + the two padding slots
    tensors = model_tensors(model)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    again = model_from_tensors(None, tensors)
    assert isinstance(again, CSA)
    assert torch.equal(embed(again, xi, "image"), embed(model, xi, "image"))
    rebuilt = build_model(model.config)
    assert isinstance(rebuilt, CSA)


def test_csa_refinement_moves_weights_and_keeps_norms():
    xi, xt = _planted(n=200)
    model = fit_csa(xi, xt, dim=4)
    before = model.image.weight.detach().clone()
    cfg = TrainConfig(head="csa", csa_refine_steps=3, batch_size=64, csa_refine_lr=1e-2, tau=0.1)
    model = refine_csa(model, xi, xt, cfg)
    assert not torch.equal(before, model.image.weight)
    z = embed(model, xi, "image")
    assert torch.allclose(z.norm(dim=1), torch.ones(len(z)), atol=1e-5)


def test_csa_bad_input():
    with pytest.raises(StratalignError, match="paired"):
        fit_csa(np.zeros((5, 3)), np.zeros((4, 3)), dim=2)
    with pytest.raises(StratalignError, match="NaN"):
        fit_csa(np.full((5, 3), np.nan), np.zeros((5, 3)), dim=2)


# --------------------------------------------------------------------------- CSA as published


def _naive_csa(x: np.ndarray, y: np.ndarray, ridge: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge CCA the textbook way, independent of fit_csa: the generalised eigenproblem
    C_xy C_yy^-1 C_yx w = rho^2 C_xx w (scipy), then w_y = C_yy^-1 C_yx w_x / rho. Returns (canonical variates of
    x, of y, correlations) of the top k directions."""
    import scipy.linalg

    xc, yc = x - x.mean(0), y - y.mean(0)
    n = len(x)
    cxx, cyy, cxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    cxx = cxx + ridge * np.trace(cxx) / len(cxx) * np.eye(len(cxx))
    cyy = cyy + ridge * np.trace(cyy) / len(cyy) * np.eye(len(cyy))
    m = cxy @ np.linalg.solve(cyy, cxy.T)
    vals, vecs = scipy.linalg.eigh(m, cxx)  # w^T C_xx w = 1
    order = np.argsort(vals)[::-1][:k]
    rho = np.sqrt(vals[order])
    wx = vecs[:, order]
    wy = np.linalg.solve(cyy, cxy.T @ wx) / rho
    return xc @ wx, yc @ wy, rho


def _naive_weighted_corr_sim(u: np.ndarray, v: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """The paper's weighted_corr_sim for every (image, text) pair, with explicit loops: both rows normalised
    over the kept directions, then sum_i rho_i u_i v_i."""
    out = np.zeros((len(u), len(v)))
    for a in range(len(u)):
        ua = u[a] / np.sqrt(sum(c * c for c in u[a]))
        for b in range(len(v)):
            vb = v[b] / np.sqrt(sum(c * c for c in v[b]))
            out[a, b] = sum(rho[i] * ua[i] * vb[i] for i in range(len(rho)))
    return out


@pytest.mark.parametrize("ridge,k", [(0.1, 3), (1.0, 5)])
def test_csa_weighted_score_equals_direct_weighted_corr_sim(ridge, k):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, 7)), rng.standard_normal((200, 6))
    y[:, :3] += x[:, :3] @ rng.standard_normal((3, 3))  # some shared signal, distinct correlations
    model = fit_csa(x, y, ridge=ridge, k=k)
    assert model.similarity == "weighted"
    u, v, rho = _naive_csa(x, y, ridge, k)
    assert np.allclose(model.correlations.numpy(), rho, atol=1e-5)
    xq, yq = x[:15], y[:12]  # queries and gallery rows
    want = _naive_weighted_corr_sim(u[:15], v[:12], rho)
    zi, zt = embed(model, xq.astype(np.float32), "image"), embed(model, yq.astype(np.float32), "text")
    assert torch.allclose(zi.norm(dim=1), torch.ones(15), atol=1e-5)  # unit vectors, as the search expects
    assert np.allclose((zi @ zt.T).numpy(), want, atol=1e-5)


def test_csa_k_and_ridge_act():
    xi, xt = _planted(n=400)
    base = fit_csa(xi, xt, ridge=0.1, k=8)
    fewer = fit_csa(xi, xt, ridge=0.1, k=2)
    stronger = fit_csa(xi, xt, ridge=1.0, k=8)
    assert base.correlations.numel() == 8 and fewer.correlations.numel() == 2
    assert base.image.config["d_out"] == 10 and fewer.image.config["d_out"] == 4
    # a larger ridge shrinks every canonical correlation
    assert (stronger.correlations < base.correlations - 1e-3).all()
    s = {name: (embed(m, xi[:50], "image") @ embed(m, xt[:50], "text").T).numpy()
         for name, m in (("base", base), ("fewer", fewer), ("stronger", stronger))}
    assert np.abs(s["base"] - s["fewer"]).max() > 0.05 and np.abs(s["base"] - s["stronger"]).max() > 0.05


def test_csa_cosine_option_is_structures_baseline():
    """similarity=cosine keeps the plain cosine over the kept directions and the config older stores hold."""
    xi, xt = _planted(n=300)
    model = fit_csa(xi, xt, ridge=1e-3, k=0, similarity="cosine")
    assert model.image.config == {"kind": "csa", "d_in": xi.shape[1], "d_out": min(xi.shape[1], xt.shape[1])}
    with torch.no_grad():
        u = model.image.variates(torch.from_numpy(xi))
    assert torch.allclose(embed(model, xi, "image"), torch.nn.functional.normalize(u, dim=1), atol=1e-6)
    weighted = fit_csa(xi, xt, ridge=1e-3, k=0)
    again = model_from_tensors(None, model_tensors(weighted))
    assert again.similarity == "weighted" and torch.equal(embed(again, xi, "image"), embed(weighted, xi, "image"))
    with pytest.raises(StratalignError, match="similarity"):
        fit_csa(xi, xt, similarity="dot")
    with pytest.raises(StratalignError, match="k must be"):
        fit_csa(xi, xt, k=-1)
