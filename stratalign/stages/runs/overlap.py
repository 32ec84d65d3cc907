"""What an evaluation on another dataset shares with the run's training data (docs/method.md § 4, "Overlap").

A dataset made from the same sources as the run's (another cut of one photo collection, a copy with other
captions) may hold, in its test split, images the run trained on (same content hash) or captions it trained on
(the same text): scored as they are, such pairs make the run look better than it is. The overlap is measured
per test pair against the run's training pairs (the subset saved beside its weights); the evaluation then
reports the metrics on the pairs that share neither beside the metrics on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from stratalign.stages.subsets import PairRows
from stratalign.store.datasets import PairDataset


@dataclass(frozen=True)
class Trained:
    """The content hashes of a run's training images and the texts of its training captions."""

    image_hashes: pl.Series
    caption_texts: pl.Series

    @classmethod
    def of(cls, ds: PairDataset, subset: PairRows) -> "Trained":
        """What the run trained on: the rows of `subset` in its dataset `ds`."""
        hashes = ds.images["sha"].gather(np.unique(subset.image_rows)).unique()
        texts = ds.captions["text"].gather(np.unique(subset.caption_rows)).unique()
        return cls(hashes, texts)


@dataclass(frozen=True)
class Overlap:
    """Per test pair of the evaluated dataset: is its image one the run trained on (by content hash), is its
    caption one it trained on (exact text)."""

    image_seen: np.ndarray
    caption_seen: np.ndarray

    @classmethod
    def measure(cls, ds: PairDataset, pairs: PairRows, trained: Trained) -> "Overlap":
        hashes = ds.images["sha"].gather(pairs.image_rows)
        texts = ds.captions["text"].gather(pairs.caption_rows)
        return cls(hashes.is_in(trained.image_hashes.implode()).to_numpy(),
                   texts.is_in(trained.caption_texts.implode()).to_numpy())

    @property
    def unseen(self) -> np.ndarray:
        """The pairs whose image and caption the run never trained on."""
        return ~(self.image_seen | self.caption_seen)

    def summary(self, pairs: PairRows) -> dict[str, int]:
        """Counts over the test split: its images and captions, those the run trained on, and what is left."""
        seen_images = np.unique(pairs.image_rows[self.image_seen])
        unseen = self.unseen
        return {"test_images": int(len(np.unique(pairs.image_rows))), "images_trained_on": int(len(seen_images)),
                "test_captions": int(len(pairs)), "captions_trained_on": int(self.caption_seen.sum()),
                "unseen_images": int(len(np.unique(pairs.image_rows[unseen]))), "unseen_captions": int(unseen.sum())}
