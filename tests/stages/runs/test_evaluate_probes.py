"""The frozen-feature probes beside a CoMM run's probe are fitted once per process for the same rows (every seed of
a cell with all pairs reads the same ones), and give what a fresh fit gives."""

from __future__ import annotations

from unittest import mock

import numpy as np

from stratalign.core import scoring
from stratalign.stages.runs import evaluate


def test_frozen_probes_are_fitted_once_for_the_same_rows() -> None:
    rng = np.random.default_rng(0)
    y = np.array(["a", "b", "c"] * 20)
    shift = {"a": 0.0, "b": 1.5, "c": -1.5}
    tr_i, tr_t = (rng.standard_normal((60, 6)) + np.array([shift[v] for v in y])[:, None] for _ in range(2))
    te_i, te_t = tr_i[:30] + 0.1, tr_t[:30] - 0.1
    evaluate._FROZEN_PROBES.clear()
    with mock.patch.object(evaluate.scoring_mod, "linear_probe", wraps=scoring.linear_probe) as fit:
        first = evaluate.frozen_probes(tr_i, tr_t, y, te_i, te_t, y[:30])
        again = evaluate.frozen_probes(tr_i.copy(), tr_t.copy(), y.copy(), te_i, te_t, y[:30])
        assert fit.call_count == 3 and again == first  # image, text, concat: once
        other = evaluate.frozen_probes(tr_i, tr_t, y, te_i, te_t, y[::-1][:30])  # other labels: fitted again
        assert fit.call_count == 6 and other != first
    assert list(first) == ["image", "text", "concat"]
    concat = scoring.linear_probe(np.concatenate([tr_i, tr_t], 1), y, np.concatenate([te_i, te_t], 1), y[:30])
    assert first["concat"] == {k: round(v, 2) for k, v in concat.items()}
