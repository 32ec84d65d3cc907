"""Layer-similarity metrics against direct dense implementations of docs/method.md § 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import similarity as similarity_mod
from stratalign.errors import StratalignError

# ---------------------------------------------------------------------------------------------------------
# Dense references: the formulas of docs/method.md written out with n x n matrices.


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_knn(a: np.ndarray, k: int) -> np.ndarray:
    """kNN of unit rows by dense scores, self excluded, ties by the lower index."""
    a32 = a.astype(np.float32).astype(np.float64)
    s = (a32[:, None, :] * a32[None, :, :]).sum(-1)
    np.fill_diagonal(s, -np.inf)
    ties = np.broadcast_to(np.arange(len(a)), s.shape)
    return np.lexsort((ties, -s), axis=-1)[:, :k]


def mask(nbrs: np.ndarray) -> np.ndarray:
    n = len(nbrs)
    m = np.zeros((n, n))
    m[np.arange(n)[:, None], nbrs] = 1.0
    return m


def ref_mutual(a, b, k):
    na, nb = dense_knn(unit(a), k), dense_knn(unit(b), k)
    return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))]))


def ref_cycle(a, b, k):
    na, nb = dense_knn(unit(a), k), dense_knn(unit(b), k)
    return float(np.mean([any(i in na[j] for j in nb[i]) for i in range(len(a))]))


def hsic(k_, l_):
    n = len(k_)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k_ @ h @ l_ @ h)


def hsic_u(k_, l_):
    n = len(k_)
    kt, lt = k_.copy(), l_.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def ref_cka(a, b, unbiased=False):
    a, b = unit(a), unit(b)
    k_, l_ = a @ a.T, b @ b.T
    f = hsic_u if unbiased else hsic
    return float(f(k_, l_) / (np.sqrt(f(k_, k_) * f(l_, l_)) + 1e-6))


def ref_cknna(a, b, k):
    a, b = unit(a), unit(b)
    k_, l_ = a @ a.T, b @ b.T
    ma, mb = mask(dense_knn(a, k)), mask(dense_knn(b, k))
    m = ma * mb
    return float(hsic_u(m * k_, m * l_) / (np.sqrt(hsic_u(ma * k_, ma * k_) * hsic_u(mb * l_, mb * l_)) + 1e-6))


REFS = {
    "mutual_knn": lambda a, b, k: ref_mutual(a, b, k),
    "cycle_knn": lambda a, b, k: ref_cycle(a, b, k),
    "cka": lambda a, b, k: ref_cka(a, b),
    "unbiased_cka": lambda a, b, k: ref_cka(a, b, unbiased=True),
    "cknna": lambda a, b, k: ref_cknna(a, b, k),
}


def paired(n: int, da: int, db: int, seed: int, noise: float = 1.0, offset: float = 0.0):
    """Two views of a shared latent (so every metric is far from its chance value)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    a = z @ rng.normal(size=(6, da)) + noise * rng.normal(size=(n, da)) + offset
    b = np.tanh(z @ rng.normal(size=(6, db))) + noise * rng.normal(size=(n, db)) + offset
    return a, b


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", list(similarity_mod.METRICS))
@pytest.mark.parametrize("n,da,db,k,offset", [(120, 16, 24, 7, 0.0), (90, 12, 8, "rice", 2.0), (40, 64, 80, 5, 0.5)])
def test_matches_dense_formula(metric: str, n: int, da: int, db: int, k, offset: float) -> None:
    a, b = paired(n, da, db, seed=n + da, offset=offset)
    kk = similarity_mod.resolve_k(k, n)
    got = similarity_mod.METRICS[metric](a, b, k)
    assert isinstance(got, float)
    assert got == pytest.approx(REFS[metric](a, b, kk), abs=1e-6)


@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn", "cknna"])
def test_dense_formula_with_duplicate_rows(metric: str) -> None:
    a, b = paired(80, 10, 10, seed=11)
    a[40:50] = a[0:10]  # exact ties in A's neighbour lists
    b[60:70] = b[5:15] * 3.0
    assert similarity_mod.METRICS[metric](a, b, 6) == pytest.approx(REFS[metric](a, b, 6), abs=1e-6)


def test_values_on_example() -> None:
    a, b = paired(120, 16, 24, seed=3, noise=0.3)
    for metric in similarity_mod.METRICS:
        value = similarity_mod.METRICS[metric](a, b, 7)
        assert 0.2 < value <= 1.0 + 1e-9, metric  # aligned views: far above chance


def test_identical_inputs_give_one() -> None:
    a = np.random.default_rng(0).normal(size=(150, 20))
    assert similarity_mod.mutual_knn(a, a, 8) == 1.0
    assert similarity_mod.cycle_knn(a, a, 8) == 1.0
    assert similarity_mod.cka(a, a) == pytest.approx(1.0, abs=1e-6)
    # the unbiased HSIC is divided by n(n-3), so the +1e-6 of the denominator shows at about 1e-5 here
    assert similarity_mod.unbiased_cka(a, a) == pytest.approx(1.0, abs=1e-4)
    assert similarity_mod.cknna(a, a, 8) == pytest.approx(1.0, abs=1e-3)  # masked HSIC_u is smaller still
    assert similarity_mod.mutual_knn(a, 5.0 * a, 8) == 1.0  # rows are normalised


def test_independent_inputs_near_chance() -> None:
    rng = np.random.default_rng(1)
    n, k = 400, 10
    values = [similarity_mod.mutual_knn(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), k) for _ in range(3)]
    assert abs(np.mean(values) - k / n) < 0.006
    assert similarity_mod.cka(rng.normal(size=(n, 32)), rng.normal(size=(n, 32))) < 0.15


def test_cka_invariances() -> None:
    a, b = paired(100, 12, 12, seed=5)
    q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(12, 12)))
    for fn in (similarity_mod.cka, similarity_mod.unbiased_cka):
        base = fn(a, b)
        assert fn(a @ q, b) == pytest.approx(base, abs=1e-9)
        assert fn(a, b @ q) == pytest.approx(base, abs=1e-9)
        assert fn(3.7 * a, 0.2 * b) == pytest.approx(base, abs=1e-9)
        assert fn(b, a) == pytest.approx(base, abs=1e-9)


def test_torch_and_float16_inputs() -> None:
    a, b = paired(60, 8, 8, seed=7)
    want = similarity_mod.mutual_knn(a.astype(np.float16), b.astype(np.float16), 5)
    assert similarity_mod.mutual_knn(torch.tensor(a.astype(np.float16)), torch.tensor(b.astype(np.float16)), 5) == want
    assert similarity_mod.cka(torch.tensor(a), torch.tensor(b)) == pytest.approx(similarity_mod.cka(a, b), abs=1e-12)


def test_clamp_outliers() -> None:
    a, b = paired(100, 10, 10, seed=8)
    a[3, 2] = 500.0  # one huge value dominates its row until clamped
    q = np.quantile(np.abs(a), 0.95)
    for metric in ("mutual_knn", "cka", "cknna"):
        clamped = similarity_mod.METRICS[metric](a, b, 6, clamp_outliers=True)
        assert clamped == pytest.approx(similarity_mod.METRICS[metric](np.clip(a, -q, q), np.clip(b, -np.quantile(np.abs(b), 0.95),
                                                                                     np.quantile(np.abs(b), 0.95)), 6))
    assert similarity_mod.cka(a, b, clamp_outliers=True) != pytest.approx(similarity_mod.cka(a, b), abs=1e-6)


# --- the matrix ------------------------------------------------------------------------------------------


def layers(n: int = 90, seed: int = 9):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    # dims below and above n: CKA runs from cross-covariances, Grams, and both within one matrix
    vis = [z @ rng.normal(size=(5, d)) + s * rng.normal(size=(n, d)) for s, d in ((2.0, 12), (0.5, 12), (1.0, 120))]
    txt = [np.tanh(z @ rng.normal(size=(5, d))) + s * rng.normal(size=(n, d)) for s, d in ((1.0, 8), (0.3, 100))]
    return vis, txt


def test_layer_similarity_equals_pair_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    vis, txt = layers()
    calls = []
    real = similarity_mod.knn_indices
    monkeypatch.setattr(similarity_mod, "knn_indices", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mats = similarity_mod.layer_similarity(vis, txt, metrics=tuple(similarity_mod.METRICS), k=6)
    assert len(calls) == len(vis) + len(txt)  # one search per layer, not per pair
    monkeypatch.setattr(similarity_mod, "knn_indices", real)
    for m, mat in mats.items():
        assert mat.shape == (3, 2)
        for v in range(3):
            for t in range(2):
                assert mat[v, t] == pytest.approx(similarity_mod.METRICS[m](vis[v], txt[t], 6), abs=1e-12), (m, v, t)
    for m in ("cka", "unbiased_cka", "cknna"):  # a d < n by d > n pair, and a Gram-by-Gram pair, against dense
        assert mats[m][0, 1] == pytest.approx(REFS[m](vis[0], txt[1], 6), abs=1e-6)
        assert mats[m][2, 1] == pytest.approx(REFS[m](vis[2], txt[1], 6), abs=1e-6)
    best = np.unravel_index(np.argmax(mats["mutual_knn"]), (3, 2))
    assert similarity_mod.choose_layers(mats["mutual_knn"], "best") == tuple(int(i) for i in best)
    assert similarity_mod.choose_layers(mats["cka"], "last") == (2, 1)


def test_layer_similarity_default_and_errors() -> None:
    vis, txt = layers()
    out = similarity_mod.layer_similarity(vis, txt)
    assert list(out) == ["mutual_knn"]
    with pytest.raises(StratalignError, match="'knn_overlap'"):
        similarity_mod.layer_similarity(vis, txt, metrics=("mutual_knn", "knn_overlap"))
    with pytest.raises(StratalignError, match=r"text layer 1 \(89\)"):
        similarity_mod.layer_similarity(vis, [txt[0], txt[1][:-1]])
    bad = vis[1].copy()
    bad[[4, 9]] = np.nan
    with pytest.raises(StratalignError, match="vision layer 1 has NaN/inf in 2 row.*4, 9"):
        similarity_mod.layer_similarity(vis[:1] + [bad], txt)
    with pytest.raises(StratalignError, match="at least one layer"):
        similarity_mod.layer_similarity([], txt)


def test_pair_errors() -> None:
    a = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(StratalignError, match="k=10"):
        similarity_mod.mutual_knn(a, a, 10)
    with pytest.raises(StratalignError, match="a has 10 rows but b has 9"):
        similarity_mod.cka(a, a[:9])
    b = a.copy()
    b[2, 0] = np.inf
    with pytest.raises(StratalignError, match=r"b has NaN/inf in 1 row\(s\): 2"):
        similarity_mod.cknna(a, b, 3)
    with pytest.raises(StratalignError, match="unbiased_cka need at least 4 rows"):
        similarity_mod.unbiased_cka(a[:3], a[:3])
    with pytest.raises(StratalignError, match="cknna need at least 4 rows"):
        similarity_mod.cknna(a[:3], a[:3], 1)
    with pytest.raises(StratalignError, match="2-D"):
        similarity_mod.cka(a[0], a[0])


def test_choose_layers() -> None:
    mat = np.array([[0.1, 0.5], [0.5, 0.2], [0.3, 0.4]])
    assert similarity_mod.choose_layers(mat) == (0, 1)  # first of the tied maxima, row-major
    assert similarity_mod.choose_layers(mat, "last") == (2, 1)
    with pytest.raises(StratalignError, match="'middle'"):
        similarity_mod.choose_layers(mat, "middle")
    mat[1, 0] = np.nan
    with pytest.raises(StratalignError, match=r"\(1, 0\)"):
        similarity_mod.choose_layers(mat)
