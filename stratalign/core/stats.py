"""Paired comparisons of two methods on the same evaluation queries (docs/method.md, "Comparisons").

"A helps over B" is a paired statement: the same seeds, subsets and splits, the difference per seed, averaged
over seeds. Its 95 % interval comes from a two-level bootstrap (`two_level_bootstrap`, what every verdict and
error bar uses): resample the training seeds with replacement, then the evaluation queries (images for i2t and
zero-shot, captions for t2i) - one query resample shared by both methods and all drawn seeds, which is what makes
it paired - and take the mean over the drawn seeds of the per-seed difference. An interval over the queries alone
(`paired_bootstrap`) treats the seeds as fixed and is too narrow when seeds disagree. Pure numpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stratalign.errors import StratalignError

HELPS, HURTS, NO_CLEAR = "helps", "hurts", "no clear difference"
DEFAULT_RESAMPLES = 2000
_CHUNK = 200  # resamples drawn at a time: bounds memory on large evaluation splits, same numbers


@dataclass(frozen=True)
class PairedDifference:
    """Mean over seeds of (method - baseline), in the unit of the hits (x100 for 0/1 hits: points of %)."""

    diff: float
    low: float
    high: float
    seeds: int
    queries: int
    resamples: int
    level: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    @property
    def half_width(self) -> float:
        """Half the interval's width: differences much smaller than this cannot be resolved here."""
        return (self.high - self.low) / 2.0


def verdict(low: float, high: float) -> str:
    """'helps' when the interval lies above 0, 'hurts' when below, else 'no clear difference'."""
    if low > 0:
        return HELPS
    if high < 0:
        return HURTS
    return NO_CLEAR


def _matrix(hits: Sequence[np.ndarray], name: str) -> np.ndarray:
    """(seeds, queries) float matrix of per-query results, one row per seed."""
    if len(hits) == 0:
        raise StratalignError(f"{name}: no seeds to compare")
    rows = [np.asarray(h, dtype=np.float64).ravel() for h in hits]
    if len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
        raise StratalignError(f"{name}: every seed needs the same, non-empty set of queries, got sizes "
                              f"{[len(r) for r in rows]}")
    return np.stack(rows)


def _check(a: np.ndarray, b: np.ndarray, resamples: int, level: float) -> None:
    """One-line refusals of a comparison that cannot be paired or bootstrapped."""
    if a.shape != b.shape:
        raise StratalignError(f"paired comparison needs the same seeds and queries: {a.shape} vs {b.shape}")
    if resamples < 1000:
        raise StratalignError(f"a bootstrap interval needs at least 1000 resamples, got {resamples}")
    if not 0 < level < 1:
        raise StratalignError(f"confidence level must be in (0, 1), got {level}")


def paired_bootstrap(method: Sequence[np.ndarray], baseline: Sequence[np.ndarray], *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95,
                     scale: float = 100.0) -> PairedDifference:
    """Paired bootstrap over queries of mean(method) - mean(baseline), averaged over seeds.

    method[s] and baseline[s] are the per-query results (0/1 hits or scores) of seed s on the same queries in
    the same order. Each resample draws the queries with replacement from a Generator seeded with `seed` (one
    `integers(0, n, n)` draw per resample, in order) and applies it to both methods and every seed.
    """
    a, b = _matrix(method, "method"), _matrix(baseline, "baseline")
    _check(a, b, resamples, level)
    # the mean over seeds of per-seed mean differences = the mean over resampled queries of d
    d = (a - b).mean(axis=0)
    n = len(d)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return PairedDifference(diff=float(scale * d.mean()), low=float(scale * low), high=float(scale * high),
                            seeds=a.shape[0], queries=n, resamples=resamples, level=level)


def two_level_bootstrap(method: Sequence[np.ndarray], baseline: Sequence[np.ndarray] | None = None, *,
                        resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95,
                        scale: float = 100.0) -> PairedDifference:
    """Two-level paired bootstrap of mean over seeds of (mean(method) - mean(baseline)) per seed.

    method[s], baseline[s]: seed s's per-query results on the same queries in the same order (baseline None: zeros,
    giving the interval of the method's own mean). Each resample draws the seeds with replacement, then the queries
    with replacement (one draw shared by every drawn seed and both methods), from one Generator seeded with `seed`.
    With one seed it is the bootstrap over queries."""
    a = _matrix(method, "method")
    b = np.zeros_like(a) if baseline is None else _matrix(baseline, "baseline")
    _check(a, b, resamples, level)
    d = a - b  # (seeds, queries)
    n_seeds, n = d.shape
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        r = stop - start
        drawn = rng.integers(0, n_seeds, size=(r, n_seeds))
        counts = np.zeros((r, n_seeds))
        np.add.at(counts, (np.arange(r)[:, None], drawn), 1.0)
        per_query = counts @ d / n_seeds  # (r, queries): the mean over the drawn seeds, query by query
        idx = rng.integers(0, n, size=(r, n))
        boot[start:stop] = np.take_along_axis(per_query, idx, axis=1).mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return PairedDifference(diff=float(scale * d.mean()), low=float(scale * low), high=float(scale * high),
                            seeds=n_seeds, queries=n, resamples=resamples, level=level)


def queries_to_resolve(queries: int, half_width: float, difference: float) -> int | None:
    """Roughly how many evaluation queries an interval of `half_width` on `queries` queries would need to resolve
    `difference` (the query part of the width shrinks as 1/sqrt(queries); seed variance does not): None for 0."""
    if difference == 0 or not math.isfinite(half_width):
        return None
    return int(math.ceil(queries * (half_width / abs(difference)) ** 2))


def majority_rate(labels: np.ndarray) -> float:
    """Share (in %) of the most frequent class: the accuracy of always guessing it."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise StratalignError("majority rate of an empty label set")
    _, counts = np.unique(labels, return_counts=True)
    return float(100.0 * counts.max() / labels.size)


def seed_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample std) over seeds; the std is None with one seed (there is no spread to show)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        raise StratalignError("no values to summarise")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float], *, resamples: int = 20000, seed: int = 0) -> tuple[float, float]:
    """(rho, two-sided p) of the Spearman rank correlation: the Pearson correlation of the ranks (ties: mean rank);
    p from every permutation of y's ranks up to 8 values (exact), else from `resamples` seeded permutations."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if len(rx) != len(ry) or len(rx) < 3:
        raise StratalignError(f"a rank correlation needs two paired sequences of at least 3 values, got {len(rx)} "
                              f"and {len(ry)}")
    rho = _pearson(rx, ry)
    if len(rx) <= 8:
        null = np.array([_pearson(rx, ry[list(p)]) for p in itertools.permutations(range(len(ry)))])
    else:
        rng = np.random.default_rng(seed)
        null = np.array([_pearson(rx, rng.permutation(ry)) for _ in range(resamples)])
    p = float(np.mean(np.abs(null) >= abs(rho) - 1e-12)) if rho == rho else float("nan")
    return rho, p
