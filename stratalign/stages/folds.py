"""K-fold cross-validation over a run's training pairs (docs/method.md § 3.8), for a dataset with no or a very
small val split: the pairs are split into k disjoint folds that cover them, by image (an image's captions all
land in one fold) or by group where the dataset names groups, with a seed. A fold's run trains on the other folds
and validates on its own; the refit trains on every pair.
"""

from __future__ import annotations

import numpy as np

from stratalign.errors import StratalignError
from stratalign.stages.subsets import PairRows
from stratalign.store.datasets import PairDataset

DEFAULT_FOLDS = 5


def check_folds(folds: object, fold: object = None) -> int:
    """`folds` as an int >= 2 (and `fold`, when given, one of 0..folds-1); a one-line error otherwise."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise StratalignError(f"--folds must be an integer of at least 2, got {folds!r}")
    if fold is not None and (not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds):
        raise StratalignError(f"fold must be an integer in 0..{folds - 1} (of {folds} folds), got {fold!r}")
    return folds


def fold_of_pairs(ds: PairDataset, pairs: PairRows, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every pair: the pairs' units (images, or groups where the dataset names them) are
    shuffled with the seed and dealt into `folds` nearly equal parts, so a unit's pairs share one fold."""
    check_folds(folds)
    units = pairs.image_rows if ds.groups is None else ds.groups[pairs.image_rows]
    uniq, where = np.unique(units, return_inverse=True)
    if len(uniq) < folds:
        kind = "images" if ds.groups is None else "groups"
        raise StratalignError(f"{folds} folds need at least {folds} {kind} among the training pairs, and there are "
                              f"{len(uniq)}: use fewer --folds or more pairs")
    order = np.random.default_rng([seed, 6151]).permutation(len(uniq))
    fold_of_unit = np.empty(len(uniq), dtype=np.int64)
    for f, part in enumerate(np.array_split(order, folds)):
        fold_of_unit[part] = f
    return fold_of_unit[where.reshape(-1)]


def fold_split(ds: PairDataset, pairs: PairRows, folds: int, fold: int, seed: int) -> tuple[PairRows, PairRows]:
    """(training pairs, held-out pairs) of fold `fold`: the other folds and this one, each in the pairs' order."""
    check_folds(folds, fold)
    held = fold_of_pairs(ds, pairs, folds, seed) == fold
    return (PairRows(pairs.image_rows[~held], pairs.caption_rows[~held]),
            PairRows(pairs.image_rows[held], pairs.caption_rows[held]))
