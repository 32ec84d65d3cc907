"""K-fold cross-validation folds (docs/method.md § 3.8): disjoint, covering the training pairs, by image (by group
where the dataset names groups), seeded; and `auto` validation picks k-fold for a dataset without a val split or
with a very small one."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stratalign.errors import StratalignError
from stratalign.stages.folds import fold_of_pairs, fold_split
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.subsets import MIN_VAL_PAIRS, PairRows, cell_validation, validation_source
from stratalign.store.datasets import PairDataset


@pytest.fixture
def karpathy_ds(karpathy_json, image_dir):
    return ingest_source("karpathy", "k", split_json=str(karpathy_json), image_dir=str(image_dir))


def _train(ds: PairDataset) -> PairRows:
    return PairRows(*ds.pairs("train"))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_are_disjoint_cover_the_pairs_and_keep_an_image_in_one_fold(karpathy_ds, k) -> None:
    pairs = _train(karpathy_ds)  # 22 images x 3 captions
    fold = fold_of_pairs(karpathy_ds, pairs, k, seed=0)
    assert fold.shape == (len(pairs),) and set(fold.tolist()) == set(range(k))
    held = [fold_split(karpathy_ds, pairs, k, f, seed=0)[1] for f in range(k)]
    caps = [set(h.caption_rows.tolist()) for h in held]
    assert sum(len(c) for c in caps) == len(pairs) and set().union(*caps) == set(pairs.caption_rows.tolist())
    for f in range(k):
        train, out = fold_split(karpathy_ds, pairs, k, f, seed=0)
        assert not set(train.caption_rows.tolist()) & caps[f] and len(train) + len(out) == len(pairs)
        assert not set(train.image_rows.tolist()) & set(out.image_rows.tolist())  # an image's captions: one side
    sizes = [len(set(h.image_rows.tolist())) for h in held]
    assert max(sizes) - min(sizes) <= 1  # images dealt evenly


def test_folds_are_seeded(karpathy_ds) -> None:
    pairs = _train(karpathy_ds)
    a, b, c = (fold_of_pairs(karpathy_ds, pairs, 5, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_folds_keep_a_group_in_one_fold(karpathy_ds) -> None:
    groups = np.arange(karpathy_ds.images.height) // 4  # images 0-3 one group, 4-7 the next, ...
    ds = PairDataset("g", karpathy_ds.images.with_columns(pl.Series("group", groups)), karpathy_ds.captions,
                     karpathy_ds.meta)
    pairs = _train(ds)
    fold = fold_of_pairs(ds, pairs, 3, seed=0)
    for g in np.unique(groups[pairs.image_rows]):
        assert len(set(fold[groups[pairs.image_rows] == g].tolist())) == 1
    assert set(fold.tolist()) == {0, 1, 2}


def test_more_folds_than_images_is_one_line(karpathy_ds) -> None:
    pairs = PairRows(*karpathy_ds.pairs("train"))
    few = PairRows(pairs.image_rows[:6], pairs.caption_rows[:6])  # 2 images
    with pytest.raises(StratalignError, match="3 folds need at least 3 images"):
        fold_of_pairs(karpathy_ds, few, 3, seed=0)
    with pytest.raises(StratalignError, match="fold must be an integer in 0..4"):
        fold_split(karpathy_ds, pairs, 5, 5, seed=0)


def test_auto_picks_kfold_without_a_val_split_or_with_a_tiny_one(karpathy_ds) -> None:
    no_val = karpathy_ds.images.with_columns(pl.col("split").replace("val", "train"))
    table = PairDataset("t", no_val, karpathy_ds.captions, karpathy_ds.meta)
    assert len(table.pairs("val")[0]) == 0 and cell_validation(table, "auto") == "kfold"
    assert validation_source(table, "auto") == "carved"  # a lone run picks its own checkpoint: carved pairs
    with pytest.raises(StratalignError, match="has no val split: use validation 'kfold'"):
        validation_source(table, "split")
    assert 0 < len(karpathy_ds.pairs("val")[0]) < MIN_VAL_PAIRS and cell_validation(karpathy_ds, "auto") == "kfold"
    assert cell_validation(karpathy_ds, "split") == "split" and cell_validation(table, "carve") == "carved"
    assert cell_validation(karpathy_ds, "kfold") == validation_source(karpathy_ds, "kfold") == "kfold"
    big_val = karpathy_ds.images.with_columns(pl.Series("split", ["val"] * 10 + ["train"] * 20))
    captions = pl.concat([karpathy_ds.captions.with_columns(pl.lit(f"{r}-").add(pl.col("caption_id"))
                                                            .alias("caption_id")) for r in range(4)])
    ds = PairDataset("big", big_val, captions, karpathy_ds.meta)  # 10 val images x 12 captions = 120 pairs
    assert len(ds.pairs("val")[0]) >= MIN_VAL_PAIRS and cell_validation(ds, "auto") == "split"
    with pytest.raises(StratalignError, match="validation must be one of auto, split, carve, kfold"):
        validation_source(ds, "folds")
