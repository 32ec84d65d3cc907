"""Pair datasets: an images table, a captions table, a split, and a content fingerprint.

Features are stored once per image and once per caption (never once per pair), rows aligned with
these tables. Two fingerprints are kept: `content_fingerprint` (images' relative paths and bytes, the
captions) keys the cached features, so re-splitting a dataset never re-encodes it; `fingerprint` also
covers the split and labels and identifies this version of the dataset.

Images may name a group (the variants of one emoji, the photos of one patient): a drawn split keeps every
group in one split (the split is drawn per group from the seed), and a given split that puts one group in
two splits is refused. Groups are kept in the images table's `group` column (only when there are any, so
datasets without groups keep their bytes); regrouping changes the split, hence `fingerprint`, never
`content_fingerprint` (no re-extraction). Byte-identical images (one content hash) join one group
(store.identical), and meta["identical_images"] says how many there were.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import polars as pl

from stratalign.errors import StratalignError, preview
from stratalign.progress import progress_bar
from stratalign.store.identical import join_identical
from stratalign.store.keys import content_fingerprint_batches, dataset_fingerprint
from stratalign.store.media import check_image
from stratalign.store.raw_records import Spill, SpilledFrame, caption_columns, image_columns
from stratalign.store.zero_shot import check_class_names, check_templates

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CHECK_BATCH = 4096  # image checks in flight at once (bounded memory on 100k+ images)


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
    image_id: str | None  # None: a caption without an image (kept with keep_unpaired)
    text: str


class PairDataset:
    """A validated pair dataset. `images` and `captions` are polars tables; meta is JSON-able.

    The captions table may live in a local Parquet file instead of memory (`captions_file`, made by an ingest of a
    large source: see `build_dataset`); `captions` then reads it on first use, and saving the dataset copies the
    file, so a 590k-caption ingest never holds the table."""

    def __init__(self, name: str, images: pl.DataFrame, captions: pl.DataFrame | None = None,
                 meta: dict[str, Any] | None = None, *, captions_file: Path | None = None,
                 spill: Spill | None = None) -> None:
        if (captions is None) == (captions_file is None):
            raise ValueError("PairDataset needs its captions as a frame or as a file, not both or neither")
        self.name, self.images, self.meta = name, images, dict(meta or {})
        self._captions, self.captions_file, self._spill = captions, captions_file, spill
        self._n_captions = captions.height if captions is not None else None

    def __repr__(self) -> str:
        return f"PairDataset({self.name!r}, {self.images.height} images, {self.n_captions} captions)"

    @property
    def captions(self) -> pl.DataFrame:
        """caption_id, image_id, image_row, text (read from `captions_file` on first use when it lives there)."""
        if self._captions is None:
            self._captions = pl.read_parquet(self.captions_file)
        return self._captions

    @property
    def n_captions(self) -> int:
        if self._n_captions is None:
            self._n_captions = pl.scan_parquet(self.captions_file).select(pl.len()).collect().item()
        return self._n_captions

    def caption_batches(self, columns: list[str], rows: int = 65_536) -> Iterator[pl.DataFrame]:
        """The captions table's `columns` in batches of about `rows` rows, without loading a table kept in a file."""
        if self._captions is not None:
            yield from self._captions.select(columns).iter_slices(rows)
        else:
            yield from pl.scan_parquet(self.captions_file).select(columns).collect_batches(chunk_size=rows)

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
        rows = self.captions["image_row"]
        img_rows, cap_rows = rows.fill_null(-1).to_numpy().astype(np.int64), np.arange(rows.len(), dtype=np.int64)
        if rows.null_count():  # a caption without an image is in no pair (docs/method.md § 3.11)
            img_rows, cap_rows = img_rows[img_rows >= 0], cap_rows[img_rows >= 0]
        if split is not None:
            keep = self.images["split"].to_numpy()[img_rows] == split
            img_rows, cap_rows = img_rows[keep], cap_rows[keep]
        return img_rows, cap_rows

    def summary(self) -> dict[str, Any]:
        counts = self.images.group_by("split").len().sort("split")
        return {
            "name": self.name,
            "images": self.images.height,
            "captions": self.n_captions,
            "splits": dict(zip(counts["split"].to_list(), counts["len"].to_list())),
            "classes": len(self.class_names),
            **({"groups": int(self.images["group"].n_unique())} if "group" in self.images.columns else {}),
            **({"identical_images": self.meta["identical_images"]["images"]}
               if self.meta.get("identical_images") else {}),
            "skipped": len(self.meta.get("skipped", [])),
            "fingerprint": self.fingerprint[:16],
        }


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


def _valid_images(images: pl.DataFrame, reject: _Rejects) -> pl.DataFrame:
    """Drop duplicate ids (the first occurrence is kept) and unknown splits."""
    first = images["image_id"].is_first_distinct()
    reject("image", sorted(set(images.filter(~first)["image_id"].to_list())), "duplicate image id")
    images = images.filter(first)
    bad_split = images.filter(pl.col("split").is_not_null() & ~pl.col("split").is_in(SPLITS))["image_id"].to_list()
    reject("image", bad_split, f"a split not in {SPLITS}")
    return images.filter(~pl.col("image_id").is_in(bad_split))


def _valid_captions(captions: pl.LazyFrame, images: pl.DataFrame, reject: _Rejects, empty_ok: bool) -> pl.LazyFrame:
    """Drop captions of unknown images and empty ones (with `empty_ok` no caption, else bad); duplicate caption ids are
    an error. Streaming passes: what is held is the bad records and, for a moment, 16 bytes a caption (duplicates)."""
    free = pl.col("image_id").is_null() if empty_ok else pl.lit(False)  # a caption without an image (§ 3.11)
    known = pl.col("image_id").is_in(images["image_id"].implode()) | free
    bad = (captions.filter(~known | (pl.col("text") == ""))  # text is normalised
           .select("caption_id", unknown=~known).collect(engine="streaming"))
    reject("caption", bad.filter(pl.col("unknown"))["caption_id"].to_list(), "an unknown image id")
    reject("caption", [] if empty_ok else bad.filter(~pl.col("unknown"))["caption_id"].to_list(), "empty text")
    valid = captions.filter(known & (pl.col("text") != ""))
    dup_c = _duplicate_ids(valid, "caption_id")
    if dup_c:
        raise StratalignError(f"{len(dup_c)} duplicate caption id(s) in dataset {reject.name!r}: {preview(dup_c)}")
    return valid


def _duplicate_ids(frame: pl.LazyFrame, column: str) -> list[str]:
    """The values of `column` that occur more than once, sorted. One pass keeps a 64-bit hash per row; only the
    rows whose hash repeats are read again to tell real duplicates from hash collisions."""
    hashed = pl.col(column).hash(seed=11)
    hashes = np.sort(frame.select(hashed).collect(engine="streaming").to_series().to_numpy())
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(repeated):
        return []
    suspects = frame.filter(hashed.is_in(pl.Series(repeated).implode())).select(column).collect()
    return sorted(set(suspects.filter(pl.col(column).is_duplicated())[column].to_list()))


def _readable_images(images: pl.DataFrame, reject: _Rejects, workers: int, progress: bool) -> pl.DataFrame:
    """The images whose file reads and decodes, with their content hash (`sha`); a bar on a terminal."""
    paths, checks = images["path"].to_list(), []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(total=len(paths), unit="image", desc="checking images", disable=None if progress else True) as bar:
        for i in range(0, len(paths), CHECK_BATCH):  # pool.map submits all at once: a future per image
            checks += pool.map(check_image, paths[i:i + CHECK_BATCH])
            bar.update(len(checks) - bar.n)
    by_reason: dict[str, list[str]] = {}
    for iid, path, (_, reason) in zip(images["image_id"].to_list(), paths, checks):
        if reason:
            by_reason.setdefault(reason.split(" (")[0], []).append(f"{iid} ({path})")
    for reason, bad in by_reason.items():
        reject("image", bad, reason)
    readable = pl.Series([reason is None for _, reason in checks], dtype=pl.Boolean)
    return images.with_columns(sha=pl.Series([sha for sha, _ in checks], dtype=pl.String)).filter(readable)


def _check_group_splits(name: str, images: pl.DataFrame) -> None:
    """A given split must keep each group in one split (else near-duplicates leak across splits)."""
    spans = (images.filter(pl.col("group").is_not_null() & pl.col("split").is_not_null())
             .group_by("group").agg(pl.col("split").n_unique()))
    torn = sorted(spans.filter(pl.col("split") > 1)["group"].to_list())
    if torn:
        raise StratalignError(f"{len(torn)} group(s) of dataset {name!r} span several splits: {preview(torn)} "
                              "(put each group in one split in the split column, or drop --group-col)")


def _tables(good: pl.DataFrame, captions: pl.LazyFrame, seed: int, fractions: tuple[float, float, float],
            spill: Spill | None, free: int = 0) -> tuple[pl.DataFrame, pl.DataFrame | Path, dict[str, int]]:
    """The images table, the captions table (captions point at their image's row): in memory, or written to a
    Parquet file in `spill` (streamed: never held), and the report of byte-identical images (store.identical).
    A drawn split is drawn per group (an image without a group is its own group; byte-identical images join one
    group), and the `group` column is there only when groups are. Frames in memory are rechunked: the Parquet bytes
    follow the frame's chunks. With `free` captions without an image, the captions table has a `split` column: theirs,
    drawn from their id as an image's is (null for the others: their image's split is theirs)."""
    joined = join_identical(good)
    split = [s or split_of(k, seed, fractions) for s, k in zip(joined.splits, joined.split_keys)]
    columns = [pl.col("image_id"), pl.col("path"), pl.col("relpath"), pl.col("sha"),
               pl.Series("split", split, dtype=pl.String), pl.col("label")]
    if any(g is not None for g in joined.groups):
        columns.append(pl.coalesce(pl.Series("group", joined.groups, dtype=pl.String), "image_id").alias("group"))
    images_df = good.select(columns).rechunk()
    rows = images_df.lazy().select("image_id", image_row=pl.int_range(pl.len(), dtype=pl.Int64))
    table = (captions.join(rows, on="image_id", how="left", maintain_order="left")  # (a join holds less than
             .select("caption_id", "image_id", "image_row", "text"))                  # replace_strict: 30 vs 60 MB)
    if free:
        table = table.with_columns(split=pl.when(pl.col("image_row").is_null()).then(pl.col("caption_id").map_elements(
            lambda c: split_of(c, seed, fractions), return_dtype=pl.String)))
    if spill is None:
        return images_df, table.collect().rechunk(), joined.report
    path = spill.new_file("captions")
    table.sink_parquet(path)
    return images_df, path, joined.report


def _as_frames(images: list[RawImage] | pl.DataFrame, captions: list[RawCaption] | pl.DataFrame | SpilledFrame
               ) -> tuple[pl.DataFrame, pl.LazyFrame, Spill | None]:
    """Raw records as the frames of store.raw_records (lists of records are converted; frames are as is); the
    captions as a LazyFrame, with the Spill folder they live in when they were spilled."""
    if not isinstance(images, pl.DataFrame):
        cols = image_columns()
        cols.extend((im.image_id, im.path, im.relpath, im.split, im.label, im.group) for im in images)
        images = cols.frame()
    if isinstance(captions, SpilledFrame):
        return images, captions.lazy, captions.spill
    if not isinstance(captions, pl.DataFrame):
        cols = caption_columns()
        cols.extend((c.caption_id, c.image_id, c.text) for c in captions)
        captions = cols.frame()
    return images, captions.lazy(), None


def build_dataset(
    name: str,
    images: list[RawImage] | pl.DataFrame,
    captions: list[RawCaption] | pl.DataFrame | SpilledFrame,
    *,
    source: dict[str, Any],
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    skip_bad: bool = False,
    templates: Sequence[str] | None = None,
    default_templates: Sequence[str] = DEFAULT_TEMPLATES,
    class_names: Mapping[str, str] | None = None,
    workers: int = 8,
    progress: bool = False,
    keep_unpaired: bool = False,
) -> PairDataset:
    """Validate raw records (lists of RawImage / RawCaption, or the frames of store.raw_records) into a PairDataset.

    Bad records (duplicate image ids, captions of unknown images, empty captions, missing or corrupt
    image files, images left without captions) raise one StratalignError naming the first few and the
    count, or, with skip_bad, are dropped and recorded in meta["skipped"] with the reason. `progress`: a bar
    over the image checks (every image file is read, decoded and hashed) on a terminal. `keep_unpaired`: images
    without a caption (empty captions name none) and captions without an image (image_id None) are rows for R_S alone
    (docs/method.md § 3.11): kept in a split and extracted like every row, never in a pair; meta["unpaired"] counts.

    Captions given as a SpilledFrame (a large source's, from store.raw_records) are validated in streaming
    passes and the captions table is written beside them: memory then follows the images, not the captions.

    Zero-shot prompts (store.zero_shot): `templates` (default: the source's `default_templates`) and
    `class_names`, a label -> name mapping that renames labels. Templates other than the default ones are part of
    the fingerprint (a dataset with other prompts is another version; datasets ingested without templates keep
    their fingerprint).
    """
    own = check_templates(templates, "templates") if templates is not None else None
    images, captions, spill = _as_frames(images, captions)
    if images.height == 0:
        raise StratalignError(f"dataset {name!r} has no images")
    if class_names:
        class_names = check_class_names(class_names, images["label"].to_list())
        images = images.with_columns(pl.col("label").replace(class_names))
    reject = _Rejects(name, skip_bad)
    _check_group_splits(name, images)
    images = _valid_images(images, reject)
    captions = _valid_captions(captions, images, reject, keep_unpaired)
    good = _readable_images(images, reject, workers, progress)
    with_captions = captions.select("image_id").unique().collect(engine="streaming")["image_id"]
    captioned = pl.col("image_id").is_in(with_captions.implode())
    reject("image", [] if keep_unpaired else good.filter(~captioned)["image_id"].to_list(), "no caption")
    unpaired, good = (good.filter(~captioned).height, good) if keep_unpaired else (0, good.filter(captioned))
    if good.height < images.height:  # captions of unreadable images go too
        captions = captions.filter(pl.col("image_id").is_in(good["image_id"].implode()) | pl.col("image_id").is_null())
    free = captions.filter(pl.col("image_id").is_null()).select(pl.len()).collect().item() if keep_unpaired else 0
    if good.height == 0:
        raise StratalignError(f"dataset {name!r} has no usable image-caption pairs left")
    images_df, captions_table, identical = _tables(good, captions, seed, fractions, spill, free)
    del good, captions, images, with_captions  # one copy of the tables is held from here on (or none, spilled)
    if isinstance(captions_table, pl.DataFrame):
        ds = PairDataset(name, images_df, captions_table)
    else:
        ds = PairDataset(name, images_df, captions_file=captions_table, spill=spill)
    labels = [x for x in images_df["label"].to_list() if x is not None]
    content_fp = content_fingerprint_batches(
        (b.rows() for b in images_df.select("image_id", "relpath", "sha").iter_slices(65_536)),
        (b.rows() for b in ds.caption_batches(["caption_id", "image_id", "text"])),
    )
    ds.meta = {
        "name": name, "source": source, "seed": seed,
        "fractions": list(fractions),
        "content_fingerprint": content_fp,
        "fingerprint": dataset_fingerprint(content_fp, images_df["split"].to_list() + [  # + free captions' splits
            x for b in (ds.caption_batches(["split"]) if free else []) for x in b["split"].drop_nulls()],
                                           images_df["label"].to_list(),
                                           None if own in (None, tuple(default_templates)) else list(own)),
        "classes": sorted(set(labels)),
        "templates": list(own or default_templates),
        "skipped": reject.skipped,
    }
    if class_names:  # only then, as for identical_images below
        ds.meta["class_names"] = dict(class_names)
    if identical:  # only then: datasets without byte-identical images keep their dataset.json bytes
        ds.meta["identical_images"] = identical
    ds.meta.update({"unpaired": {"images": unpaired, "captions": free}} if unpaired or free else {})  # likewise
    return ds
