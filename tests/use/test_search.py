"""use.search.build_index: the index type is chosen by size (exact up to EXACT_MAX, IVF above), and an IVF
index that visits every list finds what exact search finds."""

from __future__ import annotations

import numpy as np

from stratalign.use.search import EXACT_MAX, build_index


def test_index_type_is_chosen_by_size() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    flat, kind = build_index(z)
    assert kind == "flat" and len(z) <= EXACT_MAX
    ivf, kind = build_index(z, exact_max=1000)
    assert kind == "ivf63,nprobe15"
    q = z[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    _, exact = flat.search(q, 10)
    ivf.nprobe = 63  # every list: exact again
    _, every = ivf.search(q, 10)
    np.testing.assert_array_equal(np.sort(every, axis=1), np.sort(exact, axis=1))
