"""Each loss of docs/method.md § 3 against a direct, loop-based implementation of its formula."""

from __future__ import annotations

import math

import pytest
import torch

from stratalign.core.losses import (
    EPS_LOG,
    clip_loss,
    ib_deterministic,
    lambda_at,
    structure_regularizer,
    structure_regularizer_knn,
    vib_kl,
)
from stratalign.errors import StratalignError


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def naive_clip(zi: torch.Tensor, zt: torch.Tensor, tau: float) -> float:
    b = len(zi)
    s = [[float(zi[i] @ zt[j]) / tau for j in range(b)] for i in range(b)]
    def ce_row(row, target):
        m = max(row)
        return -(row[target] - m - math.log(sum(math.exp(v - m) for v in row)))
    l_it = sum(ce_row(s[i], i) for i in range(b)) / b
    l_ti = sum(ce_row([s[j][i] for j in range(b)], i) for i in range(b)) / b
    return 0.5 * (l_it + l_ti)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _centred(a: torch.Tensor, centering: str = "mean") -> tuple[list[torch.Tensor], torch.Tensor]:
    rows = [_norm(r.double()) for r in a]
    mean = sum(rows) / len(rows) if centering == "mean" else torch.zeros_like(rows[0])
    return [r - mean for r in rows], mean


def naive_affinity(a: torch.Tensor, tau: float, centering: str = "mean") -> list[list[float]]:
    c, _ = _centred(a, centering)
    n = len(c)
    return [_softmax([float(c[i] @ c[j]) / tau for j in range(n)]) for i in range(n)]


def matmul(p, q):
    n, m, r = len(p), len(q), len(q[0])
    return [[sum(p[i][k] * q[k][j] for k in range(m)) for j in range(r)] for i in range(n)]


def kl_rows(a, b) -> float:
    tot = 0.0
    for ra, rb in zip(a, b):
        tot += sum(x * (math.log(x + EPS_LOG) - math.log(y + EPS_LOG)) for x, y in zip(ra, rb))
    return tot / len(a)


def divergence(px, pz, js: str) -> float:
    m = [[0.5 * (x + y) for x, y in zip(rx, rz)] for rx, rz in zip(px, pz)]
    if js == "reference":
        return 0.5 * (kl_rows(m, pz) + kl_rows(m, px))
    return 0.5 * (kl_rows(px, m) + kl_rows(pz, m))


def naive_structure(x, z, tau, levels, weighting, js, centering="mean") -> float:
    px, pz = naive_affinity(x, tau, centering), naive_affinity(z, tau, centering)
    ds = []
    pxl, pzl = px, pz
    for level in range(1, levels + 1):
        if level > 1:
            pxl, pzl = matmul(pxl, px), matmul(pzl, pz)
        d = divergence(pxl, pzl, js)
        ds.append(d / level if weighting == "inverse" else d)
    return sum(ds) / len(ds)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 7, generator=g)
    z = torch.randn(10, 5, generator=g)
    return x, z


def test_clip_loss_matches_loops(batch):
    g = torch.Generator().manual_seed(1)
    zi = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1)
    zt = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1)
    for tau in (0.05, 0.5):
        assert float(clip_loss(zi, zt, tau)) == pytest.approx(naive_clip(zi.double(), zt.double(), tau), rel=1e-5)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("weighting", ["none", "inverse"])
@pytest.mark.parametrize("js", ["reference", "textbook"])
def test_structure_matches_loops(batch, levels, weighting, js):
    x, z = batch
    tau = 0.5 if levels == 2 else 0.1
    got = float(structure_regularizer(x, z, tau=tau, levels=levels, weighting=weighting, js=js))
    want = naive_structure(x, z, tau, levels, weighting, js)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_structure_default_tau_and_no_centering(batch):
    x, z = batch
    assert float(structure_regularizer(x, z)) == pytest.approx(
        naive_structure(x, z, 0.05, 1, "none", "reference"), rel=1e-4, abs=1e-6)
    assert float(structure_regularizer(x, z, tau=0.2, centering="none")) == pytest.approx(
        naive_structure(x, z, 0.2, 1, "none", "reference", centering="none"), rel=1e-4, abs=1e-6)


def test_reference_and_textbook_js_differ(batch):
    x, z = batch
    a = float(structure_regularizer(x, z, tau=0.1, js="reference"))
    b = float(structure_regularizer(x, z, tau=0.1, js="textbook"))
    assert a > 0 and b > 0 and abs(a - b) > 1e-6


def test_structure_zero_when_spaces_agree():
    x = torch.randn(12, 6)
    assert float(structure_regularizer(x, 3.0 * x, tau=0.1)) == pytest.approx(0.0, abs=1e-6)


def _graph(x_all: torch.Tensor, k: int) -> torch.Tensor:
    xh = torch.nn.functional.normalize(x_all, dim=1)
    s = xh @ xh.T
    s.fill_diagonal_(-float("inf"))
    return s.topk(k, dim=1).indices


def naive_knn_structure(x_all, z_all, bidx, graph, tau, levels, weighting, js) -> float:
    """Per anchor: support = set(batch) U N(i) (global ids), centred with the batch mean."""
    bidx = bidx.tolist()
    xb, zb = x_all[bidx], z_all[bidx]
    _, mx = _centred(xb)
    _, mz = _centred(zb)
    rows_x, rows_z = [], []
    for i in bidx:
        support = list(bidx) + [int(j) for j in graph[i] if int(j) not in bidx]
        ci_x = _norm(x_all[i].double()) - mx
        ci_z = _norm(z_all[i].double()) - mz
        rows_x.append(_softmax([float(ci_x @ (_norm(x_all[j].double()) - mx)) / tau for j in support]))
        rows_z.append(_softmax([float(ci_z @ (_norm(z_all[j].double()) - mz)) / tau for j in support]))
    d1 = sum(divergence([rx], [rz], js) for rx, rz in zip(rows_x, rows_z)) / len(bidx)
    ds = [d1]
    if levels >= 2:
        px, pz = naive_affinity(xb, tau), naive_affinity(zb, tau)
        pxl, pzl = px, pz
        for _level in range(2, levels + 1):
            pxl, pzl = matmul(pxl, px), matmul(pzl, pz)
            ds.append(divergence(pxl, pzl, js))
    if weighting == "inverse":
        ds = [d / (i + 1) for i, d in enumerate(ds)]
    return sum(ds) / len(ds)


def _knn_inputs(x_all, z_all, bidx, graph):
    nbr = graph[bidx]
    mask = ~torch.isin(nbr, bidx)
    return x_all[bidx], z_all[bidx], x_all[nbr], z_all[nbr], mask


def test_knn_form_with_k0_is_batch_form(batch):
    x, z = batch
    empty_x, empty_z = x.new_zeros(len(x), 0, x.shape[1]), z.new_zeros(len(z), 0, z.shape[1])
    for levels, weighting, js in [(1, "none", "reference"), (2, "inverse", "textbook")]:
        a = structure_regularizer(x, z, tau=0.2, levels=levels, weighting=weighting, js=js)
        b = structure_regularizer_knn(x, z, empty_x, empty_z, tau=0.2, levels=levels, weighting=weighting, js=js)
        assert torch.equal(a, b)


@pytest.mark.parametrize("levels,weighting,js", [(1, "none", "reference"), (2, "inverse", "textbook"),
                                                 (2, "none", "reference")])
def test_knn_form_matches_per_row_support_loop(levels, weighting, js):
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(30, 6, generator=g)
    z_all = x_all @ torch.randn(6, 4, generator=g) + 0.3 * torch.randn(30, 4, generator=g)
    graph = _graph(x_all, 4)
    bidx = torch.tensor([0, 3, 4, 7, 11, 12, 18, 21, 25, 29])
    xb, zb, xn, zn, mask = _knn_inputs(x_all, z_all, bidx, graph)
    assert (~mask).any(), "test should cover neighbours already in the batch"
    got = float(structure_regularizer_knn(xb, zb, xn, zn, mask, tau=0.3, levels=levels, weighting=weighting, js=js))
    want = naive_knn_structure(x_all, z_all, bidx, graph, 0.3, levels, weighting, js)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_knn_form_all_masked_equals_batch_form(batch):
    x, z = batch
    xn, zn = torch.randn(10, 3, 7), torch.randn(10, 3, 5)
    mask = torch.zeros(10, 3, dtype=torch.bool)
    a = structure_regularizer(x, z, tau=0.2)
    b = structure_regularizer_knn(x, z, xn, zn, mask, tau=0.2)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_knn_form_has_gradient_through_neighbours():
    x, xn = torch.randn(8, 5), torch.randn(8, 2, 5)
    z, zn = torch.randn(8, 4, requires_grad=True), torch.randn(8, 2, 4, requires_grad=True)
    structure_regularizer_knn(x, z, xn, zn, tau=0.2).backward()
    assert zn.grad is not None and zn.grad.abs().sum() > 0


def test_ib_deterministic_loop():
    zi, zt = torch.randn(7, 4), torch.randn(7, 4)
    cos = [float(zi[i] @ zt[i]) / (float(zi[i].norm()) * float(zt[i].norm())) for i in range(7)]
    assert float(ib_deterministic(zi, zt)) == pytest.approx(1 - sum(cos) / 7, rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_vib_kl_matches_torch_distributions(symmetric):
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(5)
    mu_i, mu_t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    lv_i, lv_t = torch.tanh(torch.randn(6, 4, generator=g)), torch.tanh(torch.randn(6, 4, generator=g))
    p, q = Normal(mu_i, torch.exp(0.5 * lv_i)), Normal(mu_t, torch.exp(0.5 * lv_t))
    want = kl_divergence(p, q).sum(-1).mean()
    if symmetric:
        want = 0.5 * (want + kl_divergence(q, p).sum(-1).mean())
    assert float(vib_kl(mu_i, lv_i, mu_t, lv_t, symmetric=symmetric)) == pytest.approx(float(want), rel=1e-5)


def test_lambda_warmup_by_steps():
    assert lambda_at(0) == 0.0
    assert lambda_at(500) == pytest.approx(5.0)
    assert lambda_at(1000) == 10.0 and lambda_at(5000) == 10.0
    assert lambda_at(3, lam=2.0, warmup_steps=0) == 2.0
    assert lambda_at(1, lam=1.0, warmup_steps=4) == 0.25


def test_bad_options_raise(batch):
    x, z = batch
    with pytest.raises(StratalignError, match="weighting"):
        structure_regularizer(x, z, weighting="log")
    with pytest.raises(StratalignError, match="js"):
        structure_regularizer(x, z, js="forward")
    with pytest.raises(StratalignError, match="levels"):
        structure_regularizer(x, z, levels=0)
    with pytest.raises(StratalignError, match="rows"):
        structure_regularizer(x, z[:5])
    with pytest.raises(StratalignError, match="clip_loss"):
        clip_loss(x, z)


def test_knn_compact_table_form_equals_gathered_form():
    g = torch.Generator().manual_seed(11)
    x_all, w = torch.randn(40, 6, generator=g), torch.randn(6, 5, generator=g)
    bidx = torch.tensor([1, 4, 9, 16, 25, 36])
    nbr = torch.randint(0, 40, (6, 3), generator=g)
    mask = ~torch.isin(nbr, bidx)
    uniq, index = torch.unique(nbr, return_inverse=True)
    z_tab = (x_all[uniq] @ w).requires_grad_(True)
    z_rows = (x_all[nbr] @ w).requires_grad_(True)
    xb, zb = x_all[bidx], x_all[bidx] @ w
    compact = structure_regularizer_knn(xb, zb, x_all[uniq], z_tab, mask, tau=0.2, levels=2, nbr_index=index)
    gathered = structure_regularizer_knn(xb, zb, x_all[nbr], z_rows, mask, tau=0.2, levels=2)
    assert compact.item() == pytest.approx(gathered.item(), rel=1e-5)
    compact.backward()
    gathered.backward()
    # each table row's gradient is the sum over the places it is gathered to
    want = torch.zeros_like(z_tab).index_add_(0, index.flatten(), z_rows.grad.reshape(-1, 5))
    assert torch.allclose(z_tab.grad, want, atol=1e-6)
    with pytest.raises(StratalignError, match="nbr_index"):
        structure_regularizer_knn(xb, zb, x_all[nbr], z_rows, mask, nbr_index=index)
