"""Representational similarity of paired rows (docs/method.md § 2) and the layer x layer matrix.

Every metric takes two raw (n x d) arrays whose row i describes the same pair, L2-normalises the rows
(optionally after clamping outliers) and returns a float. `layer_similarity` builds the whole
L_vision x L_text matrix from one kNN search and a few statistics per layer; the per-pair step is a bit
lookup (kNN metrics) or one d_a x d_b cross-covariance (CKA). The single-pair functions run the same code
on a matrix of one pair, so both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stratalign.core.knn import _rowdot, as_matrix, knn_indices, l2_normalize, resolve_k
from stratalign.errors import StratalignError, preview

__all__ = ["METRICS", "KNN_METRICS", "choose_layers", "cka", "cknna", "cycle_knn", "layer_similarity",
           "layer_similarity_and_graphs", "mutual_knn", "prepare", "resolve_k", "unbiased_cka"]

KNN_METRICS = frozenset({"mutual_knn", "cknna", "cycle_knn"})
UNBIASED_METRICS = frozenset({"unbiased_cka", "cknna"})
CKA_EPS = 1e-6  # docs/method.md: cka = HSIC(K,L) / (sqrt(HSIC(K,K) HSIC(L,L)) + 1e-6)
CLAMP_QUANTILE = 0.95


def prepare(x: Any, name: str = "features", clamp_outliers: bool = False) -> np.ndarray:
    """float64 rows, finite, optionally clipped to +-(0.95 quantile of |x|), then L2-normalised."""
    arr = as_matrix(x, name)
    if clamp_outliers:
        q = float(np.quantile(np.abs(arr), CLAMP_QUANTILE))
        arr = np.clip(arr, -q, q)
    return l2_normalize(arr)


class _Layer:
    """One layer's normalised rows and the statistics the pair step needs, each computed once."""

    def __init__(self, x: Any, name: str, clamp_outliers: bool) -> None:
        self.name = name
        self.x = prepare(x, name, clamp_outliers)
        self.n, self.d = self.x.shape
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # -- kNN side ---------------------------------------------------------------------------------------
    def nbrs(self, k: int, device: str) -> np.ndarray:
        """(n, k) neighbour indices (self excluded, ties by lower index)."""
        return self._get(f"nbrs{k}", lambda: knn_indices(self.x, k, normalize=False, device=device))

    def nbr_scores(self, k: int, device: str) -> np.ndarray:
        """(n, k) float64 K_ij = <x_i, x_j> for j = nbrs[i], aligned with nbrs."""
        def fn() -> np.ndarray:
            nb = self.nbrs(k, device)
            rows = np.repeat(np.arange(self.n), k)
            return _rowdot(self.x, rows, self.x, nb.ravel()).reshape(self.n, k)
        return self._get(f"scores{k}", fn)

    def sorted_keys(self, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys i*n+j ascending, their K_ij) over the kNN mask, for score lookups."""
        def fn() -> tuple[np.ndarray, np.ndarray]:
            nb, sc = self.nbrs(k, device), self.nbr_scores(k, device)
            order = np.argsort(nb, axis=1, kind="stable")
            keys = (np.arange(self.n, dtype=np.int64)[:, None] * self.n + np.take_along_axis(nb, order, 1)).ravel()
            return keys, np.take_along_axis(sc, order, 1).ravel()
        return self._get(f"keys{k}", fn)

    def bits(self, k: int, device: str) -> np.ndarray:
        """The kNN mask M[i, j] = 1 iff j in kNN(i), as an (n, ceil(n/8)) little-endian bitset."""
        def fn() -> np.ndarray:
            nb = self.nbrs(k, device)
            width = (self.n + 7) // 8
            out = np.zeros(self.n * width, dtype=np.uint8)
            flat = np.arange(self.n, dtype=np.int64)[:, None] * width + (nb >> 3)
            np.bitwise_or.at(out, flat.ravel(), (np.uint8(1) << (nb & 7).astype(np.uint8)).ravel())
            return out.reshape(self.n, width)
        return self._get(f"bits{k}", fn)

    def precompute(self, metrics: Sequence[str], k: int, device: str) -> None:
        """Everything the pair step of these metrics reads, then drop the rows themselves (memory)."""
        if KNN_METRICS.intersection(metrics):
            self.nbrs(k, device)
        if "cknna" in metrics:
            self.sorted_keys(k, device)
            self.self_cknna(k, device)
        if "cka" in metrics or "unbiased_cka" in metrics:
            self.centred()
            self.mean()
            self.self_hsic()
        if "unbiased_cka" in metrics:
            self.self_hsic_u()
        self.x = None  # type: ignore[assignment]

    def drop_bits(self, k: int) -> None:
        self._cache.pop(f"bits{k}", None)

    def self_cknna(self, k: int, device: str) -> float:
        """sim_A(K, K) = HSIC_u(M_A * K, M_A * K)."""
        def fn() -> float:
            nb, sc = self.nbrs(k, device), self.nbr_scores(k, device)
            rows = np.repeat(np.arange(self.n, dtype=np.int64), k)
            return _hsic_u_sparse(self.n, rows, nb.ravel(), sc.ravel(), sc.ravel())
        return self._get(f"selfcknna{k}", fn)

    # -- CKA side ---------------------------------------------------------------------------------------
    @property
    def use_gram(self) -> bool:
        return self.d > self.n

    def centred(self) -> np.ndarray:
        return self._get("centred", lambda: self.x - self.x.mean(axis=0))

    def mean(self) -> np.ndarray:
        return self._get("mean", lambda: self.x.mean(axis=0))

    def gram(self) -> np.ndarray:
        """Uncentred Gram K = X X^T (only when d > n)."""
        return self._get("gram", lambda: self.x @ self.x.T)

    def gram_centred(self) -> np.ndarray:
        """H K H (only when d > n)."""
        def fn() -> np.ndarray:
            xc = self.centred()
            return xc @ xc.T
        return self._get("gramc", fn)

    def diag(self) -> np.ndarray:
        """K_ii = |x_i|^2 (1, or 0 for an all-zero row)."""
        return self._get("diag", lambda: np.einsum("nd,nd->n", self.x, self.x))

    def ones_tilde(self) -> np.ndarray:
        """K~ 1 = X (X^T 1) - diag(K)."""
        return self._get("k1", lambda: self.x @ self.x.sum(axis=0) - self.diag())

    def self_hsic(self) -> float:
        return self._get("hsic", lambda: _hsic_pair(self, self)[0])

    def self_hsic_u(self) -> float:
        return self._get("hsicu", lambda: _hsic_pair(self, self, unbiased=True)[1])


def _hsic_u_sparse(n: int, rows: np.ndarray, cols: np.ndarray, kv: np.ndarray, lv: np.ndarray) -> float:
    """HSIC_u(K', L') of Song et al. for K' = M*K, L' = M*L with the mask M given by its entries.

    tr(K'L') = sum_ij K'_ij L'_ji, so an entry (i, j) counts there only if (j, i) is in M too (K, L symmetric).
    """
    if len(rows) == 0:
        return 0.0
    keys = np.sort(rows * n + cols)
    rev = cols * n + rows
    pos = np.minimum(np.searchsorted(keys, rev), len(keys) - 1)
    both = keys[pos] == rev
    t1 = float(np.sum(kv[both] * lv[both]))
    s_k, s_l = float(kv.sum()), float(lv.sum())
    col_k = np.bincount(cols, weights=kv, minlength=n)  # (1^T K')_j
    row_l = np.bincount(rows, weights=lv, minlength=n)  # (L' 1)_j
    t3 = float(col_k @ row_l)
    return (t1 + s_k * s_l / ((n - 1) * (n - 2)) - 2.0 * t3 / (n - 2)) / (n * (n - 3))


def _hsic_pair(a: _Layer, b: _Layer, unbiased: bool = False) -> tuple[float, float]:
    """(biased HSIC tr(KHLH), unbiased HSIC_u) of the linear kernels of two layers.

    From the d_a x d_b cross-covariance C = (HA)^T (HB) unless both d > n (then from n x n Grams):
    tr(KHLH) = |C|_F^2 and tr(KL) = |A^T B|_F^2 = |C|^2 + 2n mu_a^T C mu_b + n^2 |mu_a|^2 |mu_b|^2.
    """
    n = a.n
    if a.use_gram and b.use_gram:
        biased = float(np.sum(a.gram_centred() * b.gram()))
        tr_kl = float(np.sum(a.gram() * b.gram())) if unbiased else math.nan
    else:
        c = a.centred().T @ b.centred()
        biased = float(np.sum(c * c))
        if unbiased:
            ma, mb = a.mean(), b.mean()
            tr_kl = biased + 2.0 * n * float(ma @ c @ mb) + n * n * float(ma @ ma) * float(mb @ mb)
        else:
            tr_kl = math.nan
    if not unbiased:
        return biased, math.nan
    da, db = a.diag(), b.diag()
    tr_tilde = tr_kl - float(da @ db)  # tr(K~ L~): the diagonal removed
    sum_k = float(a.ones_tilde().sum())  # 1^T K~ 1
    sum_l = float(b.ones_tilde().sum())
    cross = float(a.ones_tilde() @ b.ones_tilde())  # 1^T K~ L~ 1
    hu = (tr_tilde + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))
    return biased, hu


def _ratio(num: float, self_a: float, self_b: float) -> float:
    # An unbiased self-HSIC can dip below zero on degenerate inputs; clamp so the root stays real.
    return float(num / (math.sqrt(max(self_a * self_b, 0.0)) + CKA_EPS))


# -- pair step on prepared layers -----------------------------------------------------------------------
def _has(bits: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return ((bits[rows, cols >> 3] >> (cols & 7).astype(np.uint8)) & 1).astype(bool)


def _pair_values(metrics: Sequence[str], a: _Layer, b: _Layer, k: int, device: str) -> dict[str, float]:
    """Every asked metric of one (a, b) layer pair from the layers' cached statistics."""
    n = a.n
    out: dict[str, float] = {}
    if "cka" in metrics or "unbiased_cka" in metrics:
        biased, hu = _hsic_pair(a, b, unbiased="unbiased_cka" in metrics)
        if "cka" in metrics:
            out["cka"] = _ratio(biased, a.self_hsic(), b.self_hsic())
        if "unbiased_cka" in metrics:
            out["unbiased_cka"] = _ratio(hu, a.self_hsic_u(), b.self_hsic_u())
    if not KNN_METRICS.intersection(metrics):
        return out
    nb_b = b.nbrs(k, device)
    rows = np.broadcast_to(np.arange(n)[:, None], nb_b.shape)
    bits = a.bits(k, device)
    if "mutual_knn" in metrics or "cknna" in metrics:
        hit = _has(bits, rows, nb_b)  # is B-neighbour j of i also an A-neighbour of i?
        if "mutual_knn" in metrics:  # (1/n) sum_i |kNN_A(i) & kNN_B(i)| / k
            out["mutual_knn"] = float(np.count_nonzero(hit) / (n * k))
        if "cknna" in metrics:  # entries of M = M_A * M_B, with K_ij from A's sorted keys, L_ij from B
            i, j = np.nonzero(hit)
            cols = nb_b[i, j]
            lv = b.nbr_scores(k, device)[i, j]
            keys, ks = a.sorted_keys(k, device)
            kv = ks[np.searchsorted(keys, i * n + cols)]
            sim = _hsic_u_sparse(n, i.astype(np.int64), cols, kv, lv)
            out["cknna"] = _ratio(sim, a.self_cknna(k, device), b.self_cknna(k, device))
    if "cycle_knn" in metrics:  # i in kNN_A(j) for some j in kNN_B(i)
        back = _has(bits, nb_b, rows)
        out["cycle_knn"] = float(np.count_nonzero(back.any(axis=1)) / n)
    return {m: out[m] for m in metrics}


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise StratalignError(f"unknown metric(s) {preview([repr(m) for m in unknown])}; known: {', '.join(METRICS)}")
    if not metrics:
        raise StratalignError("no metric asked; known: " + ", ".join(METRICS))
    return metrics


def _check_n(n: int, metrics: Sequence[str], k: int | str) -> int | None:
    if n < 2:
        raise StratalignError(f"need at least 2 paired rows, got {n}")
    if any(m in UNBIASED_METRICS for m in metrics) and n < 4:
        bad = [m for m in metrics if m in UNBIASED_METRICS]
        raise StratalignError(f"{preview(bad)} need at least 4 rows (unbiased HSIC divides by n(n-3)), got {n}")
    return resolve_k(k, n) if any(m in KNN_METRICS for m in metrics) else None


def _pair(metric: str, a: Any, b: Any, k: int | str, clamp_outliers: bool, device: str) -> float:
    la, lb = _Layer(a, "a", clamp_outliers), _Layer(b, "b", clamp_outliers)
    if la.n != lb.n:
        raise StratalignError(f"a has {la.n} rows but b has {lb.n}; rows must be paired one to one")
    kk = _check_n(la.n, (metric,), k)
    return _pair_values((metric,), la, lb, kk or 0, device)[metric]


# -- public single-pair metrics -------------------------------------------------------------------------
def mutual_knn(a: Any, b: Any, k: int | str = "rice", *, clamp_outliers: bool = False, device: str = "auto") -> float:
    """(1/n) sum_i |kNN_A(i) & kNN_B(i)| / k: how much the two spaces agree on neighbourhoods (~k/n at random)."""
    return _pair("mutual_knn", a, b, k, clamp_outliers, device)


def cka(a: Any, b: Any, k: int | str | None = None, *, clamp_outliers: bool = False, device: str = "auto") -> float:
    """Linear (biased) CKA: tr(KHLH) / (sqrt(tr(KHKH) tr(LHLH)) + 1e-6) on unit rows; k is ignored."""
    return _pair("cka", a, b, "rice", clamp_outliers, device)


def unbiased_cka(a: Any, b: Any, k: int | str | None = None, *, clamp_outliers: bool = False,
                 device: str = "auto") -> float:
    """CKA with the unbiased HSIC of Song et al. 2012 (needs n >= 4); k is ignored."""
    return _pair("unbiased_cka", a, b, "rice", clamp_outliers, device)


def cknna(a: Any, b: Any, k: int | str = "rice", *, clamp_outliers: bool = False, device: str = "auto") -> float:
    """CKA restricted to mutual-kNN pairs: HSIC_u(M*K, M*L) / (sqrt(sim_A sim_B) + 1e-6), M = M_A * M_B."""
    return _pair("cknna", a, b, k, clamp_outliers, device)


def cycle_knn(a: Any, b: Any, k: int | str = "rice", *, clamp_outliers: bool = False, device: str = "auto") -> float:
    """Fraction of rows i that some B-neighbour j of i has i among its A-neighbours (B then A, back to i)."""
    return _pair("cycle_knn", a, b, k, clamp_outliers, device)


METRICS: dict[str, Callable[..., float]] = {
    "mutual_knn": mutual_knn,
    "cka": cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
    "cycle_knn": cycle_knn,
}


# -- the layer matrix -----------------------------------------------------------------------------------
def layer_similarity(vision_layers: Sequence[Any], text_layers: Sequence[Any],
                     metrics: Sequence[str] = ("mutual_knn",), k: int | str = "rice", *,
                     clamp_outliers: bool = False, device: str = "auto") -> dict[str, np.ndarray]:
    """{metric: (L_vision, L_text) float64 matrix}, entry [v, t] = metric(vision_layers[v], text_layers[t]).

    One kNN search per layer (L_v + L_t in all) and per-layer statistics; the L_v x L_t pair step reuses
    them (bitset lookups for kNN metrics, one cross-covariance per pair for CKA)."""
    return layer_similarity_and_graphs(vision_layers, text_layers, metrics, k, clamp_outliers=clamp_outliers,
                                       device=device)[0]


def layer_similarity_and_graphs(vision_layers: Sequence[Any], text_layers: Sequence[Any],
                                metrics: Sequence[str] = ("mutual_knn",), k: int | str = "rice", *,
                                clamp_outliers: bool = False, device: str = "auto",
                                ) -> tuple[dict[str, np.ndarray], tuple[list[np.ndarray], list[np.ndarray]] | None]:
    """`layer_similarity`, and the (vision, text) per-layer (n, k) neighbour lists it searched (None when no kNN
    metric was asked): what the permutation null (`core.calibration`) reuses instead of searching again."""
    metrics = _check_metrics(metrics)
    if len(vision_layers) == 0 or len(text_layers) == 0:
        raise StratalignError(f"need at least one layer per modality, got {len(vision_layers)} vision "
                              f"and {len(text_layers)} text")
    vis = [_Layer(x, f"vision layer {i}", clamp_outliers) for i, x in enumerate(vision_layers)]
    txt = [_Layer(x, f"text layer {i}", clamp_outliers) for i, x in enumerate(text_layers)]
    n = vis[0].n
    wrong = [f"{layer.name} ({layer.n})" for layer in vis + txt if layer.n != n]
    if wrong:
        raise StratalignError(f"all layers must have the same paired rows; vision layer 0 has {n} rows but "
                              f"{preview(wrong)} differ")
    kk = _check_n(n, metrics, k) or 0
    for layer in vis + txt:
        layer.precompute(metrics, kk, device)
    out = {m: np.full((len(vis), len(txt)), np.nan) for m in metrics}
    for v, a in enumerate(vis):
        for t, b in enumerate(txt):
            for m, value in _pair_values(metrics, a, b, kk, device).items():
                out[m][v, t] = value
        a.drop_bits(kk)  # one bitset alive at a time: n^2/8 bytes
    if not KNN_METRICS.intersection(metrics):
        return out, None
    return out, ([a.nbrs(kk, device) for a in vis], [b.nbrs(kk, device) for b in txt])


def choose_layers(matrix: Any, rule: str = "best") -> tuple[int, int]:
    """(vision, text) layer pair: `best` = argmax (first on ties, row-major), `last` = the last of each."""
    mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2 or mat.size == 0:
        raise StratalignError(f"layer matrix must be a non-empty 2-D array, got shape {mat.shape}")
    if rule == "last":
        return mat.shape[0] - 1, mat.shape[1] - 1
    if rule != "best":
        raise StratalignError(f"layer rule must be best or last, not {rule!r}")
    bad = np.argwhere(~np.isfinite(mat))
    if len(bad):
        raise StratalignError(f"layer matrix has non-finite entries at {preview([tuple(map(int, p)) for p in bad])}")
    v, t = np.unravel_index(int(np.argmax(mat)), mat.shape)
    return int(v), int(t)
