"""Paired comparisons of two methods on the same evaluation queries (METHOD.md section 4, "Comparisons").

"A helps over B" is a paired statement: the same seeds, subsets and splits, the difference per seed, and a
95 % percentile interval from a bootstrap over evaluation queries (images for i2t and zero-shot, captions for
t2i) pooled over seeds. One resample of the queries is applied to both methods and to every seed (that is
what makes it paired), the per-seed differences of the means are averaged over seeds, and the interval is
read off the resampled averages. Pure numpy: per-query hits in, numbers out.
"""

from __future__ import annotations

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


def paired_bootstrap(method: Sequence[np.ndarray], baseline: Sequence[np.ndarray], *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95,
                     scale: float = 100.0) -> PairedDifference:
    """Paired bootstrap over queries of mean(method) - mean(baseline), averaged over seeds.

    method[s] and baseline[s] are the per-query results (0/1 hits or scores) of seed s on the same queries in
    the same order. Each resample draws the queries with replacement from a Generator seeded with `seed` (one
    `integers(0, n, n)` draw per resample, in order) and applies it to both methods and every seed.
    """
    a, b = _matrix(method, "method"), _matrix(baseline, "baseline")
    if a.shape != b.shape:
        raise StratalignError(f"paired comparison needs the same seeds and queries: {a.shape} vs {b.shape}")
    if resamples < 1000:
        raise StratalignError(f"a bootstrap interval needs at least 1000 resamples, got {resamples}")
    if not 0 < level < 1:
        raise StratalignError(f"confidence level must be in (0, 1), got {level}")
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
