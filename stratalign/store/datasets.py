"""Pair datasets: an images table, a captions table, a split, and a content fingerprint.

Features are stored once per image and once per caption (never once per pair), rows aligned with
these tables. Two fingerprints are kept: `content_fingerprint` (images' relative paths and bytes, the
captions) keys the cached features, so re-splitting a dataset never re-encodes it; `fingerprint` also
covers the split and labels and identifies this version of the dataset.

Images may name a group (the variants of one emoji, the photos of one patient): a drawn split keeps every
group in one split (the split is drawn per group from the seed), and a given split that puts one group in
two splits is refused. Groups are kept in the images table's `group` column (only when there are any, so
datasets without groups keep their bytes); regrouping changes the split, hence `fingerprint`, never
`content_fingerprint` (no re-extraction).
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import polars as pl
from PIL import Image

from stratalign.errors import StratalignError, preview
from stratalign.store.keys import content_fingerprint, dataset_fingerprint

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class RawImage:
    image_id: str
    path: str
    relpath: str
    split: str | None = None
    label: str | None = None
    group: str | None = None  # images of one group always land in one split


@dataclass
class RawCaption:
    caption_id: str
    image_id: str
    text: str


@dataclass
class PairDataset:
    """A validated pair dataset. `images` and `captions` are polars tables; meta is JSON-able."""

    name: str
    images: pl.DataFrame  # image_id, path, relpath, sha, split, label
    captions: pl.DataFrame  # caption_id, image_id, image_row, text
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def content_fingerprint(self) -> str:
        return self.meta["content_fingerprint"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def templates(self) -> list[str]:
        return list(self.meta.get("templates") or DEFAULT_TEMPLATES)

    @property
    def groups(self) -> np.ndarray | None:
        """The group of each image row (None when the dataset names no groups)."""
        return self.images["group"].to_numpy() if "group" in self.images.columns else None

    def split_counts(self) -> dict[str, int]:
        """Images per split."""
        counts = self.images.group_by("split").len()
        return dict(zip(counts["split"].to_list(), counts["len"].to_list()))

    def require_train_split(self, doing: str) -> None:
        """Refuse (one line, with the fix) to `doing` on a dataset that has no train images."""
        if self.split_counts().get("train", 0) == 0:
            raise StratalignError(f"dataset {self.name!r} has no train split, so it cannot be used to {doing}: "
                                  + no_train_fix(self.name))

    def image_rows(self, split: str | None = None) -> np.ndarray:
        """Row indices of the images of a split (all rows when split is None)."""
        if split is None:
            return np.arange(self.images.height)
        return np.flatnonzero((self.images["split"] == split).to_numpy())

    def pairs(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image_row, caption_row) of every pair, optionally of one split: one pair per caption."""
        img_rows = self.captions["image_row"].to_numpy().astype(np.int64)
        cap_rows = np.arange(self.captions.height, dtype=np.int64)
        if split is not None:
            keep = self.images["split"].to_numpy()[img_rows] == split
            img_rows, cap_rows = img_rows[keep], cap_rows[keep]
        return img_rows, cap_rows

    def summary(self) -> dict[str, Any]:
        counts = self.images.group_by("split").len().sort("split")
        return {
            "name": self.name,
            "images": self.images.height,
            "captions": self.captions.height,
            "splits": dict(zip(counts["split"].to_list(), counts["len"].to_list())),
            "classes": len(self.class_names),
            **({"groups": int(self.images["group"].n_unique())} if "group" in self.images.columns else {}),
            "skipped": len(self.meta.get("skipped", [])),
            "fingerprint": self.fingerprint[:16],
        }


def _check_image(path: str) -> tuple[str | None, str | None]:
    """(content hash, None) for a readable image, (None, reason) otherwise."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing file"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable; decode for real
            im.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return None, f"corrupt image ({type(exc).__name__}: {str(exc)[:60]})"
    return hashlib.blake2b(data, digest_size=16).hexdigest(), None


def no_train_fix(name: str) -> str:
    """The fix for a dataset without train images (ingest warns with it, layers and train refuse with it)."""
    return (f"ingest it again (--replace) with a split column that marks train rows (--split-col), or without "
            f"--split-col to draw a 70/10/20 train/val/test split by --seed; as it is, {name!r} can only be "
            f"evaluated on (`stratalign eval --run RUN --dataset {name}`)")


def split_of(image_id: str, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Deterministic split of one image from a hash of (seed, id): stable when images are added."""
    h = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    edges = np.cumsum(fractions)
    return SPLITS[int(np.searchsorted(edges, u, side="right").clip(0, 2))]


class _Rejects:
    """Bad records of one dataset: raised as one error naming the first few, or recorded under skip_bad."""

    def __init__(self, name: str, skip_bad: bool) -> None:
        self.name, self.skip_bad = name, skip_bad
        self.skipped: list[dict[str, str]] = []

    def __call__(self, kind: str, ids: list[str], reason: str) -> None:
        if not ids:
            return
        if not self.skip_bad:
            raise StratalignError(
                f"{len(ids)} {kind}(s) with {reason} in dataset {self.name!r}: {preview(ids)} "
                "(fix them or pass --skip-bad to ingest the rest)"
            )
        self.skipped.extend({"kind": kind, "id": i, "reason": reason} for i in ids)


def _valid_images(images: list[RawImage], reject: _Rejects) -> list[RawImage]:
    """Drop duplicate ids (the first occurrence is kept) and unknown splits."""
    seen: set[str] = set()
    dup = [im.image_id for im in images if im.image_id in seen or seen.add(im.image_id)]
    reject("image", sorted(set(dup)), "duplicate image id")
    if dup:  # keep the first occurrence of each id
        seen, unique = set(), []
        for im in images:
            if im.image_id not in seen:
                seen.add(im.image_id)
                unique.append(im)
        images = unique
    bad_split = [im.image_id for im in images if im.split is not None and im.split not in SPLITS]
    reject("image", bad_split, f"a split not in {SPLITS}")
    return [im for im in images if im.image_id not in set(bad_split)]


def _valid_captions(captions: list[RawCaption], images: list[RawImage], reject: _Rejects) -> list[RawCaption]:
    """Drop captions of unknown images and empty ones; duplicate caption ids are an error."""
    ids = {im.image_id for im in images}
    unknown = [c.caption_id for c in captions if c.image_id not in ids]
    reject("caption", unknown, "an unknown image id")
    empty = [c.caption_id for c in captions if c.image_id in ids and not (c.text or "").strip()]
    reject("caption", empty, "empty text")
    bad_caps = set(unknown) | set(empty)
    captions = [c for c in captions if c.caption_id not in bad_caps]
    cap_ids = [c.caption_id for c in captions]
    if len(set(cap_ids)) != len(cap_ids):
        seen_c: set[str] = set()
        dup_c = sorted({c for c in cap_ids if c in seen_c or seen_c.add(c)})
        raise StratalignError(f"{len(dup_c)} duplicate caption id(s) in dataset {reject.name!r}: {preview(dup_c)}")
    return captions


def _readable_images(images: list[RawImage], reject: _Rejects, workers: int) -> list[tuple[RawImage, str]]:
    """(image, content hash) of the images whose file reads and decodes."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(lambda im: _check_image(im.path), images))
    by_reason: dict[str, list[str]] = {}
    for im, (_, reason) in zip(images, checks):
        if reason:
            by_reason.setdefault(reason.split(" (")[0], []).append(f"{im.image_id} ({im.path})")
    for reason, bad in by_reason.items():
        reject("image", bad, reason)
    return [(im, sha) for im, (sha, reason) in zip(images, checks) if reason is None]


def _check_group_splits(name: str, images: list[RawImage]) -> None:
    """A given split must keep each group in one split (else near-duplicates leak across splits)."""
    seen: dict[str, set[str]] = {}
    for im in images:
        if im.group is not None and im.split is not None:
            seen.setdefault(im.group, set()).add(im.split)
    torn = sorted(g for g, s in seen.items() if len(s) > 1)
    if torn:
        raise StratalignError(f"{len(torn)} group(s) of dataset {name!r} span several splits: {preview(torn)} "
                              "(put each group in one split in the split column, or drop --group-col)")


def _tables(good: list[tuple[RawImage, str]], captions: list[RawCaption], seed: int,
            fractions: tuple[float, float, float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The images and captions tables (captions point at their image's row); a drawn split is drawn per group
    (an image without a group is its own group), and the `group` column is there only when groups are."""
    columns: dict[str, list] = {
        "image_id": [im.image_id for im, _ in good],
        "path": [im.path for im, _ in good],
        "relpath": [im.relpath for im, _ in good],
        "sha": [sha for _, sha in good],
        "split": [im.split or split_of(im.image_id if im.group is None else f"group:{im.group}", seed, fractions)
                  for im, _ in good],
        "label": [im.label for im, _ in good],
    }
    schema = {"image_id": pl.String, "path": pl.String, "relpath": pl.String, "sha": pl.String,
              "split": pl.String, "label": pl.String}
    if any(im.group is not None for im, _ in good):
        columns["group"] = [im.group if im.group is not None else im.image_id for im, _ in good]
        schema["group"] = pl.String
    images_df = pl.DataFrame(columns, schema=schema)
    row_of = {iid: i for i, iid in enumerate(images_df["image_id"].to_list())}
    captions_df = pl.DataFrame(
        {
            "caption_id": [c.caption_id for c in captions],
            "image_id": [c.image_id for c in captions],
            "image_row": [row_of[c.image_id] for c in captions],
            "text": [" ".join(c.text.split()) for c in captions],
        },
        schema={"caption_id": pl.String, "image_id": pl.String, "image_row": pl.Int64, "text": pl.String},
    )
    return images_df, captions_df


def build_dataset(
    name: str,
    images: list[RawImage],
    captions: list[RawCaption],
    *,
    source: dict[str, Any],
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    skip_bad: bool = False,
    templates: tuple[str, ...] | None = None,
    workers: int = 8,
) -> PairDataset:
    """Validate raw records into a PairDataset.

    Bad records (duplicate image ids, captions of unknown images, empty captions, missing or corrupt
    image files, images left without captions) raise one StratalignError naming the first few and the
    count, or, with skip_bad, are dropped and recorded in meta["skipped"] with the reason.
    """
    if not images:
        raise StratalignError(f"dataset {name!r} has no images")
    reject = _Rejects(name, skip_bad)
    _check_group_splits(name, images)
    images = _valid_images(images, reject)
    captions = _valid_captions(captions, images, reject)
    good = _readable_images(images, reject, workers)
    captioned = {c.image_id for c in captions}
    lonely = [im.image_id for im, _ in good if im.image_id not in captioned]
    reject("image", lonely, "no caption")
    good = [(im, sha) for im, sha in good if im.image_id in captioned]
    kept = {im.image_id for im, _ in good}
    captions = [c for c in captions if c.image_id in kept]
    if not good:
        raise StratalignError(f"dataset {name!r} has no usable image-caption pairs left")
    images_df, captions_df = _tables(good, captions, seed, fractions)
    labels = [x for x in images_df["label"].to_list() if x is not None]
    content_fp = content_fingerprint(
        list(zip(images_df["image_id"].to_list(), images_df["relpath"].to_list(), images_df["sha"].to_list())),
        list(zip(captions_df["caption_id"].to_list(), captions_df["image_id"].to_list(),
                 captions_df["text"].to_list())),
    )
    meta = {
        "name": name,
        "source": source,
        "seed": seed,
        "fractions": list(fractions),
        "content_fingerprint": content_fp,
        "fingerprint": dataset_fingerprint(content_fp, images_df["split"].to_list(), images_df["label"].to_list()),
        "classes": sorted(set(labels)),
        "templates": list(templates or DEFAULT_TEMPLATES),
        "skipped": reject.skipped,
    }
    return PairDataset(name=name, images=images_df, captions=captions_df, meta=meta)
