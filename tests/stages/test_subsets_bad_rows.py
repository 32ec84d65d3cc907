"""Rows that `extract --skip-bad` encoded as blank placeholders never reach layer choice, training or evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.subsets import PairRows, drop_bad_pairs


class _Marked:
    """Stands in for a FeatureEntry: only its bad rows matter here."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)

    def bad_rows(self) -> np.ndarray:
        return self.rows


def test_drop_bad_pairs_on_either_side() -> None:
    pairs = PairRows(np.array([0, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 4]))
    kept, dropped = drop_bad_pairs(pairs, _Marked([2]), _Marked([1]))
    assert dropped == 2
    assert kept.image_rows.tolist() == [0, 1, 3] and kept.caption_rows.tolist() == [0, 2, 4]
    same, none = drop_bad_pairs(pairs, _Marked([]), _Marked([]))
    assert none == 0 and same.caption_rows.tolist() == [0, 1, 2, 3, 4]


@pytest.fixture
def skipped_store(store_with_dataset):
    """The toy store extracted with --skip-bad after one train image and one test image went corrupt."""
    store, ds = store_with_dataset
    split = ds.images["split"].to_list()
    bad = sorted([split.index("train"), split.index("test")])
    for row in bad:
        Path(ds.images["path"][row]).write_bytes(b"garbage")
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False,
                                        skip_bad=True), load=load_tiny)
    return store, ds, bad


def _pairs_of(ds, split: str, bad: list[int]) -> tuple[int, int]:
    """(pairs of the split, those whose image is bad)."""
    img_rows, _ = ds.pairs(split)
    return len(img_rows), int(np.isin(img_rows, bad).sum())


def test_placeholder_rows_are_dropped_from_every_stage(skipped_store) -> None:
    from stratalign.stages.layers import LayersConfig, compute_layer_matrices, sample_train_pairs
    from stratalign.stages.runs.training import RunConfig, resolve_run, train_run

    store, ds, bad = skipped_store
    v, t = store.find_entry("toy", "tiny-image"), store.find_entry("toy", "tiny-text")
    assert v.bad_rows().tolist() == bad and t.bad_rows().size == 0
    _, train_bad = _pairs_of(ds, "train", bad)
    n_test, test_bad = _pairs_of(ds, "test", bad)
    assert train_bad > 0 and test_bad > 0

    img_rows, _, dropped = sample_train_pairs(store, "toy", 1000, 0, (v, t))
    assert dropped == train_bad and not np.isin(img_rows, bad).any()
    layers = compute_layer_matrices(store, LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", k=3))
    assert layers["bad_pairs_dropped"] == train_bad and layers["n"] == len(img_rows)

    cfg = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", objective="csa", head="csa")
    resolved = resolve_run(store, cfg)
    subset, val = resolved.subset, resolved.val
    assert resolved.bad_pairs_dropped == train_bad
    assert not np.isin(np.concatenate([subset.image_rows, val.image_rows]), bad).any()
    res = train_run(store, cfg, resolved=resolved)
    assert res["eval_bad_pairs_dropped"] == test_bad and res["eval_captions"] == n_test - test_bad
