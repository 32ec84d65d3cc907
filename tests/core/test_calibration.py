"""The permutation null of the layer matrix against the `calibrated-similarity` package (METHOD.md 2, calibration):
same statistic (mutual kNN, computed here by brute force in torch, independently of core.similarity), same null
(the text rows permuted, one permutation shared by every text layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import calibration, similarity
from stratalign.errors import StratalignError

calibrated_similarity = pytest.importorskip("calibrated_similarity")

K_NN = 8
PERMS = 200


def _layers(n: int = 160, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """3 vision and 2 text layers over one latent, from almost no shared signal to a strong one."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    vis = [z @ rng.normal(size=(6, 20)) * s + rng.normal(size=(n, 20)) for s in (0.05, 0.4, 2.0)]
    txt = [z @ rng.normal(size=(6, 12)) * s + rng.normal(size=(n, 12)) for s in (0.3, 1.5)]
    return vis, txt


def _mutual_knn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Brute-force mutual kNN: cosine neighbours, self excluded."""
    def nbrs(a: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(a.double(), dim=1)
        sim = a @ a.T
        sim.fill_diagonal_(-torch.inf)
        return sim.topk(K_NN, dim=1).indices

    na, nb = nbrs(x), nbrs(y)
    hits = (na[:, :, None] == nb[:, None, :]).any(2).sum()
    return hits / (len(x) * K_NN)


def _ours(vis, txt, seed):
    raw, (gv, gt) = similarity.layer_similarity_and_graphs(vis, txt, ("mutual_knn",), k=K_NN)
    perms = calibration.permutations(len(vis[0]), PERMS, seed)
    null = calibration.overlap_null(gv, gt, perms)["mutual_knn"]
    return raw["mutual_knn"], null, calibration.summarise(raw["mutual_knn"], null)


def _package(vis, txt, seed):
    """Per pair: the package's p-value and the mean of its null (recorded from the sim calls it makes);
    the family-wise p-value of the max over the matrix."""
    xs = [torch.from_numpy(v) for v in vis]
    ys = [torch.from_numpy(t) for t in txt]
    p = np.zeros((len(xs), len(ys)))
    mean = np.zeros_like(p)
    for v, x in enumerate(xs):
        for t, y in enumerate(ys):
            seen: list[float] = []

            def sim(a, b, seen=seen):
                value = _mutual_knn(a, b)
                seen.append(float(value))
                return value

            _, pv, _ = calibrated_similarity.calibrate(x, y, sim, K=PERMS, generator=torch.Generator().manual_seed(seed))
            p[v, t] = float(pv)
            mean[v, t] = np.mean(seen[1:])  # the first call is the observed score
    _, p_max, _ = calibrated_similarity.calibrate_layers(xs, ys, _mutual_knn, agg="max", K=PERMS,
                                                         generator=torch.Generator().manual_seed(seed))
    return p, mean, float(p_max)


def test_same_seed_same_null_as_the_package() -> None:
    """Permutations drawn from the same generator: the package's null is ours, value for value."""
    vis, txt = _layers()
    raw, null, ours = _ours(vis, txt, seed=7)
    p, mean, p_max = _package(vis, txt, seed=7)
    np.testing.assert_allclose(ours["p"], p, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours["null_mean"], mean, rtol=0, atol=1e-7)
    best = np.unravel_index(int(np.argmax(raw)), raw.shape)
    assert ours["family_p"][best[0]][best[1]] == pytest.approx(p_max, abs=1e-7)


def test_other_seeds_agree_within_monte_carlo_error() -> None:
    """Independent permutations: the p-values and null means agree within their Monte Carlo error."""
    vis, txt = _layers(seed=1)
    raw, null, ours = _ours(vis, txt, seed=0)
    p, mean, p_max = _package(vis, txt, seed=12345)
    sd_mean = null.std(0, ddof=1) / np.sqrt(PERMS)  # of each null mean
    assert np.all(np.abs(np.asarray(ours["null_mean"]) - mean) <= 5 * np.sqrt(2) * sd_mean)
    best = np.unravel_index(int(np.argmax(raw)), raw.shape)
    for got, want in ((np.asarray(ours["p"]), p), (ours["family_p"][best[0]][best[1]], p_max)):
        se = np.sqrt(np.maximum(want * (1 - want), 1 / PERMS) / PERMS)
        assert np.all(np.abs(got - want) <= 5 * np.sqrt(2) * se + 1 / (PERMS + 1))
    # the weakest pair is within the null, the strongest far beyond it
    assert ours["p"][0][0] > 0.01 and ours["p"][2][1] == pytest.approx(1 / (PERMS + 1))


def test_identity_permutation_is_the_raw_matrix_and_null_mean_is_k_over_n() -> None:
    vis, txt = _layers()
    raw, (gv, gt) = similarity.layer_similarity_and_graphs(vis, txt, ("mutual_knn", "cycle_knn"), k=K_NN)
    ident = calibration.overlap_null(gv, gt, np.arange(len(vis[0]))[None], ("mutual_knn", "cycle_knn"))
    for m in ("mutual_knn", "cycle_knn"):
        assert np.array_equal(ident[m][0], raw[m])  # same counts, same division: the p-value ties are exact
    _, null, ours = _ours(vis, txt, seed=3)
    n = len(vis[0])
    assert np.allclose(ours["null_mean"], K_NN / (n - 1), atol=4 * null.std() / np.sqrt(PERMS) + 1e-3)


def test_verdict_on_the_last_pair_and_bad_input() -> None:
    vis, txt = _layers()
    raw, _, ours = _ours(vis, txt, seed=0)
    last = calibration.pair_verdict(ours, 2, 1)
    assert not last["beats_last"] and last["null_spread"] == 0.0
    weak = calibration.pair_verdict(ours, 0, 0)
    assert not weak["beats_last"] and weak["calibrated_score"] < last["calibrated_score"]
    with pytest.raises(StratalignError, match="no permutation null for \\['cka'\\]"):
        calibration.overlap_null([np.zeros((4, 1), int)], [np.zeros((4, 1), int)], np.arange(4)[None], ("cka",))
    with pytest.raises(StratalignError, match="positive integer"):
        calibration.permutations(10, 0, 0)
