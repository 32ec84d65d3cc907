"""Subsets come from the train split only, are seeded, and never overlap validation."""

from __future__ import annotations

import numpy as np
import pytest

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.subsets import carve_validation, draw_subset, subset_from_ids


@pytest.fixture
def karpathy_ds(karpathy_json, image_dir):
    return ingest_source("karpathy", "k", split_json=str(karpathy_json), image_dir=str(image_dir))


def test_validation_carved_from_train_by_image(karpathy_ds) -> None:
    pool, val = carve_validation(karpathy_ds, 0.2, seed=0)
    splits = karpathy_ds.images["split"].to_numpy()
    assert (splits[pool.image_rows] == "train").all() and (splits[val.image_rows] == "train").all()
    assert not set(pool.image_rows) & set(val.image_rows)
    assert len(pool) + len(val) == 22 * 3 and len(set(val.image_rows)) == round(22 * 0.2)
    pool2, val2 = carve_validation(karpathy_ds, 0.2, seed=0)
    np.testing.assert_array_equal(val.caption_rows, val2.caption_rows)


def test_draw_subset_seeded_and_bounded(karpathy_ds) -> None:
    pool, _ = carve_validation(karpathy_ds, 0.2, seed=0)
    a, b, c = draw_subset(pool, 10, 1), draw_subset(pool, 10, 1), draw_subset(pool, 10, 2)
    np.testing.assert_array_equal(a.caption_rows, b.caption_rows)
    assert not np.array_equal(a.caption_rows, c.caption_rows)
    assert set(a.caption_rows) <= set(pool.caption_rows)
    with pytest.raises(StratalignError, match="larger than the train split"):
        draw_subset(pool, len(pool) + 1, 0)


def test_subset_from_ids(karpathy_ds) -> None:
    pool, _ = carve_validation(karpathy_ds, 0.0, seed=0)
    sub = subset_from_ids(karpathy_ds, pool, ["0", "1", "5\n"])  # caption ids 0,1 and 5
    assert sorted(sub.caption_rows.tolist()) == [0, 1, 5]
    by_image = subset_from_ids(karpathy_ds, pool, ["1"], kind="image")  # image 1 has captions 3, 4, 5
    assert sorted(by_image.caption_rows.tolist()) == [3, 4, 5]
    test_caption = karpathy_ds.captions["caption_id"][int(karpathy_ds.pairs("test")[1][0])]
    with pytest.raises(StratalignError, match=f"in val/test.*{test_caption}"):
        subset_from_ids(karpathy_ds, pool, ["0", test_caption])
