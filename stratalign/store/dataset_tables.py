"""A dataset's files in the store: datasets/<name>/dataset.json (meta, written last: it marks the dataset
whole), images.parquet and captions.parquet. `FeatureStore` exposes these as its dataset methods."""

from __future__ import annotations

import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from stratalign.errors import StratalignError
from stratalign.store.cleanup import clean_folder
from stratalign.store.datasets import PairDataset
from stratalign.store.keys import FORMAT_VERSION
from stratalign.store.location import Location, validate_key
from stratalign.version import __version__

FOLDER = "datasets"
META = "dataset.json"


def names(loc: Location) -> list[str]:
    """Names of the datasets that have a dataset.json (the loadable ones, barring damage)."""
    return [n for n in loc.listdir(FOLDER) if loc.exists(FOLDER, n, META)]


def folders(loc: Location) -> list[str]:
    """Every folder under datasets/, whole or not (what `store verify` checks)."""
    return loc.listdirs(FOLDER)


def folder(loc: Location, name: str) -> str:
    """The name, validated, of an existing dataset folder (loadable or not); a one-line error otherwise."""
    validate_key(name, "dataset name")
    if not loc.isdir(FOLDER, name):
        raise StratalignError(f"dataset {name!r} not in store {loc.url}; known: {', '.join(folders(loc)) or 'none'}")
    return name


def _fingerprint_of(loc: Location, name: str, replace: bool) -> str | None:
    """The stored fingerprint of a dataset (None if absent, or unreadable while replacing it)."""
    if not loc.exists(FOLDER, name, META):
        return None
    try:
        meta = loc.read_json(FOLDER, name, META)
    except StratalignError:
        if replace:
            return None
        raise
    return str(meta.get("fingerprint", "?")) if isinstance(meta, dict) else "?"


def save(loc: Location, ds: PairDataset, *, replace: bool = False) -> bool:
    """Store a dataset's tables; True if written, False if the identical dataset was already there.

    dataset.json marks a dataset whole: when replacing, the old one is removed before any table is
    written and the new one is written last, so a crash leaves the old dataset or one that refuses to load.
    """
    validate_key(ds.name, "dataset name")
    clean_folder(loc, "datasets", ds.name)  # temp files a killed writer left (see store.cleanup)
    old = _fingerprint_of(loc, ds.name, replace)
    if old == ds.fingerprint and _loads(loc, ds.name):
        return False  # identical and whole (a damaged copy of the same content is rewritten below)
    if old is not None and old != ds.fingerprint and not replace:
        raise StratalignError(
            f"dataset {ds.name!r} already exists in {loc.url} with different content "
            f"(fingerprint {old[:12]} vs {ds.fingerprint[:12]}); choose another --name or pass --replace"
        )
    loc.remove(FOLDER, ds.name, META)
    _write_table(loc, ds.images, FOLDER, ds.name, "images.parquet")
    if ds.captions_file is not None:  # a large table kept in a file by the ingest: copied, never loaded
        loc.write_file(ds.captions_file, FOLDER, ds.name, "captions.parquet")
    else:
        _write_table(loc, ds.captions, FOLDER, ds.name, "captions.parquet")
    meta = {**ds.meta, "format_version": FORMAT_VERSION, "stratalign_version": __version__,
            "n_images": ds.images.height, "n_captions": ds.n_captions}
    loc.write_json(meta, FOLDER, ds.name, META)  # written last: marks the dataset whole
    return True


def _write_table(loc: Location, frame: pl.DataFrame, *parts: str) -> None:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    loc.write_bytes(buf.getvalue(), *parts)


def _loads(loc: Location, name: str) -> bool:
    """Does the stored dataset load (dataset.json readable, both tables decodable Parquet of the recorded sizes)?
    The tables are decoded batch by batch: a 590k-caption table is checked without being held."""
    try:
        meta = loc.read_json(FOLDER, name, META)
        for table, key in (("images", "n_images"), ("captions", "n_captions")):
            with loc.fs.open(loc.path(FOLDER, name, f"{table}.parquet"), "rb") as f:
                file = pq.ParquetFile(f)
                if file.metadata.num_rows != meta.get(key):
                    return False
                for _ in file.iter_batches(batch_size=65_536):
                    pass
    except (StratalignError, OSError, pa.ArrowException, AttributeError):
        return False
    return True


def read_meta(loc: Location, name: str) -> dict:
    """A dataset's dataset.json (its fingerprints, sizes, classes, templates) without decoding its tables; a
    missing or malformed one is a one-line error."""
    validate_key(name, "dataset name")
    if not loc.exists(FOLDER, name, META):
        if loc.isdir(FOLDER, name):
            raise StratalignError(
                f"dataset {name!r} in {loc.url} has no dataset.json (interrupted ingest or replace); "
                f"ingest it again, or remove it with `stratalign store rm --dataset {name}`"
            )
        known = names(loc)
        raise StratalignError(
            f"dataset {name!r} not in store {loc.url}; known: {', '.join(known) or 'none'} "
            f"(ingest it with `stratalign ingest`)"
        )
    meta = loc.read_json(FOLDER, name, META)
    if not isinstance(meta, dict):
        raise StratalignError(f"dataset {name!r}: {loc.path(FOLDER, name, META)} is not an object")
    return meta


def load(loc: Location, name: str, meta: dict | None = None) -> PairDataset:
    """Load a dataset (`meta`: its dataset.json when the caller has just read it); a missing dataset.json,
    unreadable tables or a size mismatch are one-line errors."""
    if meta is None:
        meta = read_meta(loc, name)
    try:
        images = pl.read_parquet(io.BytesIO(loc.read_bytes(FOLDER, name, "images.parquet")))
        captions = pl.read_parquet(io.BytesIO(loc.read_bytes(FOLDER, name, "captions.parquet")))
    except Exception as exc:
        raise StratalignError(f"dataset {name!r} tables are unreadable ({type(exc).__name__}: {str(exc)[:100]}); "
                              f"ingest it again: `stratalign ingest ... --name {name} --replace`") from None
    if images.height != meta.get("n_images") or captions.height != meta.get("n_captions"):
        raise StratalignError(f"dataset {name!r} tables do not match its dataset.json (truncated store?); "
                              f"ingest it again: `stratalign ingest ... --name {name} --replace`")
    return PairDataset(name=name, images=images, captions=captions, meta=meta)


def remove(loc: Location, name: str) -> None:
    """Remove a dataset folder (loadable or not): dataset.json first, so a crash leaves it unloadable."""
    folder(loc, name)
    loc.remove(FOLDER, name, META)
    loc.remove(FOLDER, name, recursive=True)
