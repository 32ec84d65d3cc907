"""Training subsets: row selections over cached features, drawn from the TRAIN split only.

Validation pairs (checkpoint selection) are the dataset's own val split when it has at least MIN_VAL_PAIRS pairs
(docs/method.md § 3.8); otherwise k-fold cross-validation over the training pairs (stages.folds), or on request
pairs carved out of the train split, by image (an image's captions all land on one side) or by group where the
dataset names groups. The training subset is drawn from the train pool with a seed. The evaluation split is
never touched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stratalign.errors import StratalignError, preview
from stratalign.store.datasets import PairDataset

if TYPE_CHECKING:
    from stratalign.store.feature_store import FeatureEntry


@dataclass(frozen=True)
class PairRows:
    """Pairs as (image row, caption row) index arrays into the feature entries."""

    image_rows: np.ndarray
    caption_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.image_rows)


def drop_bad_pairs(pairs: PairRows, image_entry: "FeatureEntry", text_entry: "FeatureEntry") -> tuple[PairRows, int]:
    """(the pairs whose image row and caption row both hold real features, how many were dropped).

    `extract --skip-bad` encodes an unreadable row as a blank placeholder and records it in the shard
    markers (`FeatureEntry.bad_rows`); a pair with such a row on either side must not be trained or scored on."""
    bad = np.isin(pairs.image_rows, image_entry.bad_rows()) | np.isin(pairs.caption_rows, text_entry.bad_rows())
    if not bad.any():
        return pairs, 0
    return PairRows(pairs.image_rows[~bad], pairs.caption_rows[~bad]), int(bad.sum())


VALIDATION_CHOICES = ("auto", "split", "carve", "kfold")
# where a run's validation pairs came from: the val split, carved from the train split, a held-out fold of k-fold
# cross-validation, or none (REFIT: the run trains on every pair, to the step chosen over the folds)
SPLIT, CARVED, KFOLD, REFIT = "split", "carved", "kfold", "refit"
# a cell's auto (the cells of train/tune/sweep/demo, which choose over several runs) takes the dataset's val split
# when it holds at least this many pairs, else k-fold (docs/method.md § 3.8): on a smaller split a seed moves the
# validation rsum by more than the knobs move its mean
MIN_VAL_PAIRS = 100


def validation_source(ds: PairDataset, choice: str = "auto") -> str:
    """SPLIT (the dataset's own val split), CARVED (from the train split) or KFOLD (a fold of k-fold over the
    training pairs) for one run's `validation` choice. A lone run's auto is the val split when the dataset has one,
    carved otherwise (it picks its own checkpoint: nothing to average over folds); `cell_validation` is the auto of
    a cell."""
    if choice not in VALIDATION_CHOICES:
        raise StratalignError(f"validation must be one of {', '.join(VALIDATION_CHOICES)}, not {choice!r}")
    has_val = len(ds.pairs("val")[0]) > 0
    if choice == "split" and not has_val:
        raise StratalignError(f"dataset {ds.name!r} has no val split: use validation 'kfold' (or 'auto', or "
                              "'carve' to carve validation pairs from the train split)")
    if choice == "auto":
        return SPLIT if has_val else CARVED
    return {"split": SPLIT, "carve": CARVED, "kfold": KFOLD}[choice]


def cell_validation(ds: PairDataset, choice: str = "auto") -> str:
    """The validation of a cell (one choice over its seeds, stages.runs.cells): auto = the dataset's val split when
    it has at least MIN_VAL_PAIRS pairs, k-fold otherwise (no val split, or a very small one); any other choice as
    `validation_source` reads it."""
    if choice == "auto":
        return SPLIT if len(ds.pairs("val")[0]) >= MIN_VAL_PAIRS else KFOLD
    return validation_source(ds, choice)


def validation_pairs(ds: PairDataset, source: str, val_fraction: float, seed: int) -> tuple[PairRows, PairRows]:
    """(train pool, validation) pairs: the train and val splits (SPLIT), carve_validation (CARVED), or the whole
    train split and no validation pairs (KFOLD: the folds are cut from the run's training pairs, stages.folds)."""
    ds.require_train_split("train a run")
    if source == KFOLD:
        empty = np.zeros(0, dtype=np.int64)
        return PairRows(*ds.pairs("train")), PairRows(empty, empty)
    if source == SPLIT:
        return PairRows(*ds.pairs("train")), PairRows(*ds.pairs("val"))
    return carve_validation(ds, val_fraction, seed)


def carve_validation(ds: PairDataset, val_fraction: float, seed: int) -> tuple[PairRows, PairRows]:
    """(train pool, validation) pairs of the train split, split by image (by group when the dataset names
    groups) with a seed."""
    img_rows, cap_rows = ds.pairs("train")
    if len(img_rows) == 0:
        ds.require_train_split("train a run")
    groups = ds.groups
    units = img_rows if groups is None else groups[img_rows]  # what is kept on one side
    uniq = np.unique(units)
    rng = np.random.default_rng([seed, 7919])
    n_val = int(round(len(uniq) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(uniq) - 1)
    val_units = rng.choice(uniq, size=n_val, replace=False) if n_val else uniq[:0]
    is_val = np.isin(units, val_units)
    return PairRows(img_rows[~is_val], cap_rows[~is_val]), PairRows(img_rows[is_val], cap_rows[is_val])


def draw_subset(pool: PairRows, n_pairs: int | None, seed: int) -> PairRows:
    """n pairs of the pool drawn with a seed (all of them when n is None), in a fixed order."""
    if n_pairs is None or n_pairs == len(pool):
        return pool
    if n_pairs < 2:
        raise StratalignError(f"--n-pairs must be at least 2, got {n_pairs}")
    if n_pairs > len(pool):
        raise StratalignError(
            f"subset of {n_pairs} pairs is larger than the train split allows ({len(pool)} train pairs, "
            "validation pairs excluded)"
        )
    pick = np.sort(np.random.default_rng([seed, 104729]).choice(len(pool), size=n_pairs, replace=False))
    return PairRows(pool.image_rows[pick], pool.caption_rows[pick])


def subset_from_ids(ds: PairDataset, pool: PairRows, ids: list[str], kind: str = "caption") -> PairRows:
    """The pool pairs whose caption id (kind="caption") or image id (kind="image") is listed.

    Ids outside the train pool (unknown, or in val/test) are an error: a subset never leaks eval data."""
    if kind not in ("caption", "image"):
        raise StratalignError(f"id kind must be 'caption' or 'image', not {kind!r}")
    ids = [i.strip() for i in ids if i.strip()]
    if not ids:
        raise StratalignError("the --ids file lists no ids")
    if kind == "caption":
        have = np.asarray(ds.captions["caption_id"].to_list(), dtype=object)[pool.caption_rows]
    else:
        have = np.asarray(ds.images["image_id"].to_list(), dtype=object)[pool.image_rows]
    keep = np.isin(have, np.asarray(ids, dtype=object))
    found = set(have[keep])
    missing = [i for i in ids if i not in found]
    if missing:
        raise StratalignError(f"{len(missing)} {kind} id(s) of --ids are not in the train pool "
                              f"(unknown, or in val/test): {preview(missing)}")
    return PairRows(pool.image_rows[keep], pool.caption_rows[keep])
