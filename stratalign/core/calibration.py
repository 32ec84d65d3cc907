"""The permutation null of the layer matrix (METHOD.md section 2, calibration).

Raw similarity scores grow with depth and width, and the max over L_vision x L_text pairs is inflated by the
search itself ("Revisiting the Platonic Representation Hypothesis: An Aristotelian View", ICML 2026, package
`calibrated-similarity`). The null breaks the pairing: the text side's rows are permuted (one permutation shared
by every text layer, K of them, seeded) and the matrix recomputed.

For the neighbourhood-overlap metrics (mutual_knn, cycle_knn) a permutation does not need a new kNN search:
permuting the text rows by pi maps text layer t's neighbour lists to pi^-1(kNN_t(pi(i))), so each permutation
costs L_text relabellings and L_vision x L_text overlaps. The vision layers' neighbour sets are held as one
n x n byte table per 8 layers (bit b of cell [i, j]: j is a neighbour of i in layer b), so one gather of the
n k permuted text neighbours and one bincount score 8 vision layers at once.

Permutations are drawn with torch.randperm from torch.Generator().manual_seed(seed), in order: the same draws
as the package's calibrate / calibrate_layers given that generator, so both see the same null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stratalign.errors import StratalignError

CALIBRATED_METRICS = ("mutual_knn", "cycle_knn")  # the metrics whose null reuses the kNN graphs
PERMUTATIONS = 200  # K, METHOD 2
SPREAD = 2.0  # "beyond the null's spread": more than 2 null standard deviations
_CHUNK = 8  # vision layers per byte table
_BITS = ((np.arange(256)[:, None] >> np.arange(_CHUNK)) & 1).astype(np.int64)  # (256, 8): bit b of each byte


def permutations(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n) row permutations, drawn as calibrated-similarity draws them from Generator(seed)."""
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
        raise StratalignError(f"permutations must be a positive integer, not {count!r}")
    g = torch.Generator().manual_seed(int(seed))
    return np.stack([torch.randperm(n, generator=g).numpy() for _ in range(count)])


def _table(graphs: Sequence[np.ndarray]) -> np.ndarray:
    """n x n bytes: bit b of [i, j] says j is among row i's neighbours in graphs[b] (at most 8 graphs)."""
    n = graphs[0].shape[0]
    table = np.zeros((n, n), dtype=np.uint8)
    rows = np.arange(n)[:, None]
    for b, nb in enumerate(graphs):
        table[rows, nb] |= np.uint8(1 << b)
    return table


def overlap_null(vision_graphs: Sequence[np.ndarray], text_graphs: Sequence[np.ndarray],
                 perms: np.ndarray, metrics: Sequence[str] = ("mutual_knn",)) -> dict[str, np.ndarray]:
    """{metric: (K, L_vision, L_text)}: the matrix of each kNN metric with the text rows permuted by perms[p].

    graphs: each layer's (n, k) neighbour indices (self excluded), as `similarity` computes them. The identity
    permutation gives `similarity.layer_similarity`'s values exactly (same counts, same division)."""
    bad = [m for m in metrics if m not in CALIBRATED_METRICS]
    if bad:
        raise StratalignError(f"no permutation null for {bad}: calibrated metrics are {', '.join(CALIBRATED_METRICS)}")
    n, k = vision_graphs[0].shape
    lv, lt = len(vision_graphs), len(text_graphs)
    if any(g.shape != (n, k) for g in (*vision_graphs, *text_graphs)):
        raise StratalignError("every layer's kNN graph must have the same (n, k) shape")
    out = {m: np.empty((len(perms), lv, lt)) for m in metrics}
    rows = np.arange(n)[:, None]
    row_start = rows * n  # flat index of each row's first cell
    inverse = np.empty_like(perms)
    np.put_along_axis(inverse, perms, np.arange(n)[None, :].repeat(len(perms), 0), axis=1)
    for c0 in range(0, lv, _CHUNK):
        chunk = vision_graphs[c0:c0 + _CHUNK]
        c1 = c0 + len(chunk)
        flat, bits = _table(chunk).ravel(), _BITS[:, :len(chunk)]  # take() on the flat table: ~2x a 2-D gather
        for p, perm in enumerate(perms):
            inv = inverse[p]
            for t, nb in enumerate(text_graphs):
                moved = inv.take(nb.take(perm, axis=0))  # row i's text neighbours once the text rows are permuted
                if "mutual_knn" in out:  # sum_i |kNN_A(i) & kNN_B'(i)|, for 8 vision layers in one count
                    counts = np.bincount(flat.take((row_start + moved).ravel()), minlength=256) @ bits
                    out["mutual_knn"][p, c0:c1, t] = counts / (n * k)
                if "cycle_knn" in out:  # rows i that some B'-neighbour j has i among its A-neighbours
                    back = np.bitwise_or.reduce(flat.take(moved * n + rows), axis=1)
                    out["cycle_knn"][p, c0:c1, t] = (np.bincount(back, minlength=256) @ bits) / n
    return out


def summarise(raw: Any, null: np.ndarray) -> dict[str, Any]:
    """The calibration of one metric's matrix against its null (K, L_v, L_t), as JSON-able lists.

    null_mean / null_sd: per pair; calibrated = raw - null_mean; p = (1 + #{null >= raw}) / (K + 1) per pair;
    family_p: the same against the null of the MAX over all pairs (one permutation shared by the matrix), i.e.
    the family-wise p-value of taking that pair as the best; last_diff_sd: the null's spread of (pair - last
    pair), the yardstick of "better than the last layers"."""
    s = np.asarray(raw, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 3 or null.shape[1:] != s.shape or len(null) < 2:
        raise StratalignError(f"null must be (K >= 2, {s.shape[0]}, {s.shape[1]}), got {null.shape}")
    k = len(null)
    mean = null.mean(0)
    max_null = null.reshape(k, -1).max(1)
    return {
        "null_mean": mean.tolist(),
        "null_sd": null.std(0, ddof=1).tolist(),
        "calibrated": (s - mean).tolist(),
        "p": ((1 + (null >= s).sum(0)) / (k + 1)).tolist(),
        "family_p": ((1 + (max_null[:, None, None] >= s).sum(0)) / (k + 1)).tolist(),
        "max_null_mean": float(max_null.mean()),
        "max_null_q95": float(np.quantile(max_null, 0.95)),
        "last_diff_sd": (null - null[:, -1:, -1:]).std(0, ddof=1).tolist(),
    }


def pair_verdict(cal: dict[str, Any], v: int, t: int) -> dict[str, Any]:
    """What the calibration says of pair (v, t): its calibrated score, p-values, and whether it beats the last
    pair by more than the null's spread (SPREAD null standard deviations of the difference)."""
    calibrated = np.asarray(cal["calibrated"])
    diff = float(calibrated[v, t] - calibrated[-1, -1])
    spread = SPREAD * float(np.asarray(cal["last_diff_sd"])[v, t])
    is_last = (v, t) == (calibrated.shape[0] - 1, calibrated.shape[1] - 1)
    return {"calibrated_score": float(calibrated[v, t]), "p_value": float(np.asarray(cal["p"])[v, t]),
            "family_p": float(np.asarray(cal["family_p"])[v, t]), "last_calibrated": float(calibrated[-1, -1]),
            "null_spread": spread, "beats_last": (not is_last) and diff > spread}
