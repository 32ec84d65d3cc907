"""core.stats.spearman: the rank correlation of the layer check, with an exact permutation p for few values."""

from __future__ import annotations

import numpy as np
import pytest

from stratalign.core.stats import spearman
from stratalign.errors import StratalignError


def test_rho_equals_scipy_with_ties_and_p_is_the_exact_permutation_p() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n in (4, 6, 11):
        x, y = rng.normal(size=n), rng.normal(size=n)
        y[1] = y[0]  # a tie: mean ranks
        assert spearman(x, y)[0] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # five values in the same order: rho 1, and 2 of the 120 orders are as extreme (two-sided)
    assert spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == (pytest.approx(1.0), pytest.approx(2 / 120))
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])[0] == pytest.approx(-1.0)
    rho, p = spearman(np.arange(12), np.arange(12) % 3, resamples=2000)  # many values: seeded permutations
    assert -1 <= rho <= 1 and 0 < p <= 1 and spearman(np.arange(12), np.arange(12) % 3, resamples=2000)[1] == p


def test_too_few_or_unpaired_values_are_refused() -> None:
    with pytest.raises(StratalignError, match="at least 3"):
        spearman([1, 2], [2, 1])
    with pytest.raises(StratalignError, match="paired"):
        spearman([1, 2, 3], [1, 2, 3, 4])
