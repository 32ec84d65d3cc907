"""kNN search: exact neighbours with ties by lower index, against a dense argsort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import knn
from stratalign.errors import StratalignError

pytestmark = pytest.mark.faiss  # also run on faiss-gpu-cu12's module in the extras environment (.ci/run)


def unit32(x: np.ndarray) -> np.ndarray:
    """Unit rows rounded to float32 (what the search sees), back in float64."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return u.astype(np.float32).astype(np.float64)


def dense_scores(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """All inner products by elementwise product and sum (equal rows give bitwise-equal scores)."""
    return (q[:, None, :] * g[None, :, :]).sum(-1)


def dense_topk(s: np.ndarray, k: int) -> np.ndarray:
    """Top k per row by (-score, index): argsort with ties broken by the lower index."""
    ties = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    return np.lexsort((ties, -s), axis=-1)[:, :k]


def dense_knn(x: np.ndarray, k: int, normalize: bool = True) -> np.ndarray:
    a = unit32(x) if normalize else np.asarray(x, np.float32).astype(np.float64)
    s = dense_scores(a, a)
    np.fill_diagonal(s, -np.inf)
    return dense_topk(s, k)


@pytest.mark.parametrize("n,expected", [(5000, 35), (27, 6), (1000, 20), (8, 4), (2, 3)])
def test_rice_rule(n: int, expected: int) -> None:
    if expected >= n:
        with pytest.raises(StratalignError, match="smaller than the number of rows"):
            knn.resolve_k("rice", n)
    else:
        assert knn.resolve_k("rice", n) == expected
        assert knn.resolve_k("rice", n) == int(np.ceil(2 * round(n ** (1 / 3), 9)))


def test_other_rules() -> None:
    assert knn.resolve_k("sqrt", 5000) == 71
    assert knn.resolve_k("sqrt", 100) == 10
    assert knn.resolve_k("sqrt", 101) == 11
    assert knn.resolve_k("sturges", 5000) == 14
    assert knn.resolve_k("sturges", 8) == 4
    assert knn.resolve_k("sturges", 9) == 5
    assert knn.resolve_k(7, 100) == 7
    assert knn.resolve_k(np.int64(7), 100) == 7
    assert knn.resolve_k("12", 100) == 12


@pytest.mark.parametrize("k,match", [(0, "at least 1"), (-3, "at least 1"), (10, "k=10"), (11, "k=11"),
                                     ("median", "'median'"), (2.5, "2.5"), (True, "True")])
def test_bad_k(k: object, match: str) -> None:
    with pytest.raises(StratalignError, match=match):
        knn.resolve_k(k, 10)  # type: ignore[arg-type]


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]])
    np.testing.assert_allclose(knn.l2_normalize(x), [[0.6, 0.8], [0, 0], [1, 0]])
    assert knn.l2_normalize(x.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(knn.l2_normalize(torch.tensor(x)), knn.l2_normalize(x))


def test_matches_dense_random() -> None:
    x = np.random.default_rng(0).normal(size=(300, 16))
    for k in (1, 7, 40):
        got = knn.knn_indices(x, k)
        assert got.shape == (300, k) and got.dtype == np.int64
        np.testing.assert_array_equal(got, dense_knn(x, k))
        assert not (got == np.arange(300)[:, None]).any()


def test_torch_and_float32_inputs() -> None:
    x = np.random.default_rng(1).normal(size=(80, 12)).astype(np.float32)
    np.testing.assert_array_equal(knn.knn_indices(torch.from_numpy(x), 5), knn.knn_indices(x, 5))
    np.testing.assert_array_equal(knn.knn_indices(x, "rice"), dense_knn(x, knn.resolve_k("rice", 80)))


@pytest.mark.parametrize("extra", [8, 1])  # 1 forces the full re-scoring of rows whose tie run is long
def test_duplicates_ties_by_lower_index(monkeypatch: pytest.MonkeyPatch, extra: int) -> None:
    monkeypatch.setattr(knn, "_EXTRA_CPU", extra)
    rng = np.random.default_rng(2)
    base = rng.normal(size=(30, 8))
    x = np.repeat(base, 5, axis=0)[rng.permutation(150)] * rng.uniform(0.5, 2, size=(150, 1))  # scaled copies
    for k in (2, 3, 4, 5, 7, 12, 30):
        got = knn.knn_indices(x, k)
        np.testing.assert_array_equal(got, dense_knn(x, k), err_msg=f"k={k}")
    # each row's first 4 neighbours are exactly its 4 duplicates (legitimate neighbours), self excluded
    got = knn.knn_indices(x, 4)
    same = np.all(np.isclose(unit32(x)[got], unit32(x)[:, None, :]), axis=-1)
    assert same.all()


@pytest.mark.parametrize("extra", [8, 1])
def test_massive_ties_and_zero_rows(monkeypatch: pytest.MonkeyPatch, extra: int) -> None:
    monkeypatch.setattr(knn, "_EXTRA_CPU", extra)
    rng = np.random.default_rng(3)
    x = np.eye(12)[rng.integers(0, 12, size=120)]  # scores are exactly 0 or 1: huge tie groups
    x[[5, 17, 60]] = 0.0  # zero rows: score 0 against everything
    for k in (1, 6, 15, 40, 119):
        np.testing.assert_array_equal(knn.knn_indices(x, k), dense_knn(x, k), err_msg=f"k={k}")


def test_unnormalized_inner_product() -> None:
    x = np.random.default_rng(4).normal(size=(100, 6)) * np.random.default_rng(5).uniform(0.1, 10, size=(100, 1))
    np.testing.assert_array_equal(knn.knn_indices(x, 6, normalize=False), dense_knn(x, 6, normalize=False))
    assert not np.array_equal(knn.knn_indices(x, 6, normalize=False), knn.knn_indices(x, 6))


def test_knn_search_scores() -> None:
    x = np.random.default_rng(6).normal(size=(50, 5))
    sc, idx = knn.knn_search(x, 4)
    a = unit32(x)
    np.testing.assert_allclose(sc, (a[:, None, :] * a[idx]).sum(-1), atol=1e-12)
    assert (np.diff(sc, axis=1) <= 0).all()


def test_search_matches_dense_with_ties() -> None:
    rng = np.random.default_rng(7)
    g = rng.normal(size=(60, 10))
    g[40:50] = g[10:20]  # duplicate gallery rows tie exactly
    q = np.concatenate([rng.normal(size=(25, 10)), g[[10, 15, 45]]])
    for k in (1, 5, 13, 60):
        sc, idx = knn.search(g, q, k)
        s = dense_scores(unit32(q), unit32(g))
        ref = dense_topk(s, k)
        np.testing.assert_array_equal(idx, ref, err_msg=f"k={k}")
        np.testing.assert_allclose(sc, np.take_along_axis(s, ref, 1), atol=1e-6)
        assert sc.dtype == np.float32


def test_nan_rows_named() -> None:
    x = np.random.default_rng(8).normal(size=(20, 4))
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(StratalignError, match=r"2 row\(s\): 3, 7"):
        knn.knn_indices(x, 3)
    with pytest.raises(StratalignError, match="queries has NaN/inf"):
        knn.search(np.ones((5, 4)), x, 2)


def test_bad_shapes() -> None:
    with pytest.raises(StratalignError, match="2-D"):
        knn.knn_indices(np.ones(10), 2)
    with pytest.raises(StratalignError, match="k=5 .* n=5"):
        knn.knn_indices(np.random.default_rng(0).normal(size=(5, 3)), 5)
    with pytest.raises(StratalignError, match="dims"):
        knn.search(np.ones((5, 4)), np.ones((2, 3)), 2)
    with pytest.raises(StratalignError, match="1..5"):
        knn.search(np.ones((5, 4)), np.ones((2, 4)), 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_refused_without_gpu() -> None:
    with pytest.raises(StratalignError, match="device='cuda'"):
        knn.knn_indices(np.random.default_rng(0).normal(size=(10, 3)), 2, device="cuda")
    with pytest.raises(StratalignError, match="device must be"):
        knn.knn_indices(np.random.default_rng(0).normal(size=(10, 3)), 2, device="tpu")


@pytest.mark.extras
def test_the_extras_environment_runs_these_on_faiss_gpu() -> None:
    """There, `faiss` is faiss-gpu-cu12's module (faiss-cpu uninstalled: both provide it); on a machine without
    a GPU its CPU indexes serve every test above and device='cuda' is refused."""
    from importlib import metadata
    from pathlib import Path

    import faiss

    assert hasattr(faiss, "StandardGpuResources")  # the GPU build
    assert faiss.get_num_gpus() > 0 or not torch.cuda.is_available()
    owned = {Path(str(f)).parts[0] for f in metadata.files("faiss-gpu-cu12") or ()}
    assert Path(faiss.__file__).parent.name in owned
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("faiss-cpu")
