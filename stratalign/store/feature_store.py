"""The feature store: a Zarr v3 hierarchy caching every layer's pooled features for a team (layout: store/__init__).
`FeatureStore` opens or creates a store and finds, creates and lists its entries; one entry's arrays,
markers and claims are `FeatureEntry`'s (store.entry), a dataset's tables are store.dataset_tables'.
`EntrySpec`, `FeatureEntry`, `shard_sha` and the constants are re-exported here, their historical home.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import numpy as np
import polars as pl
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from stratalign.errors import StratalignError
from stratalign.store import cleanup, dataset_tables
from stratalign.store.datasets import PairDataset
from stratalign.store.entry import (
    DEFAULT_SHARD_ROWS,
    ENTRY_FORMATS,
    FLOAT16_MAX,
    LAYOUT_SHARDED,
    MODALITIES,
    EntrySpec,
    FeatureEntry,
    shard_sha,
)
from stratalign.store.keys import FORMAT_VERSION
from stratalign.store.location import Location, default_store_url, validate_key
from stratalign.store.modality_check import refuse_other_modality
from stratalign.store.shard_format import sharding_codec
from stratalign.version import __version__

__all__ = ["DEFAULT_SHARD_ROWS", "ENTRY_FORMATS", "FLOAT16_MAX", "FORMAT_VERSION", "LAYOUT_SHARDED", "MODALITIES", "STORE_TAG",
           "EntrySpec", "FeatureEntry", "FeatureStore", "shard_sha"]

STORE_TAG = "stratalign-store"


def _array_metadata(template: dict[str, Any], shape: tuple[int, int], chunks: tuple[int, int], layer_name: str,
                    chunk_rows: int = 0) -> bytes:
    """zarr.json of an array like `template` (another layer's `metadata.to_dict()`) with its own shape, chunks
    (and inner chunks of `chunk_rows` rows for layout 2), and name, serialised as zarr's `to_buffer_dict` does (a
    round trip through ArrayV3Metadata cost ~1 ms a layer, most of creating an entry)."""
    doc = {**template, "shape": list(shape), "attributes": {"layer_name": layer_name},
           "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}
    if chunk_rows:
        doc["codecs"] = [sharding_codec(chunk_rows, shape[1])]
    return json.dumps(doc, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


def _untagged_group(loc: Location, *parts: str) -> bool:
    """Is this zarr.json absent, unreadable, or a group document with no attributes yet (what zarr writes before
    `_create` sets stratalign's tag)?"""
    if not loc.exists(*parts):
        return True
    try:
        doc = json.loads(loc.read_bytes(*parts) or b"{}")
    except (ValueError, UnicodeDecodeError):
        return True
    return isinstance(doc, dict) and not doc.get("attributes")  # another's group has attributes: never ours


def _half_created(loc: Location) -> bool:
    """What an interrupted `_create` leaves and nothing else: the root zarr.json (untagged, empty or cut short),
    an empty features/ group, temp files. Such a folder is finished by the next `open(..., create=True)`."""
    names = [n for n in loc.listdir() if ".tmp-" not in n]
    if not names or not set(names) <= {"zarr.json", "features"} or not _untagged_group(loc, "zarr.json"):
        return False
    if "features" in names:
        inner = [n for n in loc.listdir("features") if ".tmp-" not in n]
        return set(inner) <= {"zarr.json"}
    return True


class FeatureStore:
    """A stratalign store. Open an existing one with `FeatureStore.open(url, mode="r"|"a")`; create one with
    `FeatureStore.open(url, mode="a", create=True)` (what `ingest` and `demo` do).

    A store object holds what it has read, so a command resolving many runs reads each thing once: a loaded
    dataset (kept while its dataset.json names the same fingerprint) and the listing of features/ (dropped by
    this object's own writes; a lookup that finds nothing in it lists features/ again, so entries another
    process wrote since are found). `forget_held()` drops both."""

    def __init__(self, loc: Location, root: zarr.Group, mode: str) -> None:
        self.loc = loc
        self.root = root
        self.mode = mode
        self._datasets: dict[str, PairDataset] = {}  # name -> its loaded tables, while its fingerprint holds
        self._listing: list[tuple[str, FeatureEntry | None, str | None]] | None = None  # features/, as last scanned

    def forget_held(self) -> None:
        """Drop the datasets and the features/ listing this object holds (after another writer changed them)."""
        self._datasets.clear()
        self._listing = None

    @property
    def url(self) -> str:
        return self.loc.url

    @classmethod
    def open(cls, url: str | None = None, mode: str = "r", *, create: bool = False) -> "FeatureStore":
        """Open an existing store read-only ('r') or for writing ('a'); with create=True (mode 'a' only) make
        it when absent. Refuse anything that is not a stratalign store, and never create one by accident."""
        if mode not in ("r", "a"):
            raise StratalignError(f"store mode must be 'r' or 'a', not {mode!r}")
        if create and mode != "a":
            raise StratalignError("creating a store needs mode 'a'")
        url = url or default_store_url()
        loc = Location.from_url(url)
        if loc.fs.isfile(loc.root):
            raise StratalignError(f"store path {url} is a file, not a store folder")
        if not loc.exists("zarr.json") or _half_created(loc):
            if not create:
                if loc.exists() and _half_created(loc):
                    raise StratalignError(f"{url} is a half-created stratalign store (a command creating it was "
                                          "interrupted): rerun `stratalign ingest ...` to finish it, or remove the folder")
                raise StratalignError(f"no stratalign store at {url}; create one with `stratalign ingest ...`")
            if loc.exists() and loc.listdir():
                print(f"note: finishing the store at {url} that an interrupted command left half-created",
                      file=sys.stderr, flush=True)
            return cls._create(loc)
        loc.read_json("zarr.json")  # a corrupt root metadata file is named in a one-line error
        try:
            root = zarr.open_group(store=url, mode="r" if mode == "r" else "r+")
        except Exception as exc:
            raise StratalignError(f"{url} is not a readable Zarr store: {type(exc).__name__}: {exc}") from None
        tag = root.attrs.get("stratalign")
        if not isinstance(tag, dict) or tag.get("kind") != STORE_TAG:
            raise StratalignError(f"{url} is a Zarr hierarchy but not a stratalign store")
        if tag.get("format_version") != FORMAT_VERSION:
            raise StratalignError(
                f"store {url} has format version {tag.get('format_version')} (written by stratalign "
                f"{tag.get('created_by')}); this stratalign reads version {FORMAT_VERSION}"
            )
        return cls(loc, root, mode)

    @classmethod
    def _create(cls, loc: Location) -> "FeatureStore":
        """A new, empty store in an absent or empty folder (never in someone else's files)."""
        if loc.exists() and loc.listdir():
            if not _half_created(loc):
                raise StratalignError(f"{loc.url} is a non-empty folder that is not a stratalign store; use another --store")
            for name in loc.listdir():  # the leftovers carry nothing: start again from an empty folder
                loc.remove(name, recursive=True)
        root = zarr.open_group(store=loc.url, mode="a")
        root.attrs["stratalign"] = {"kind": STORE_TAG, "format_version": FORMAT_VERSION,
                                    "created_by": __version__}
        root.require_group("features")
        return cls(loc, root, "a")

    def require_writable(self, doing: str = "") -> None:
        """Raise a one-line error unless the store is open for writing (mode 'a'): what would write (`doing`,
        checked by a stage before it computes anything) and the fix."""
        if self.mode != "a":
            raise StratalignError(f"store {self.url} is open read-only" + (f" and {doing} writes to it" if doing else "")
                                  + f": open it for writing, stratalign.open_store({self.url!r}, 'a')")

    # ----- datasets (see store.dataset_tables)
    def datasets(self) -> list[str]:
        """Names of the datasets that have a dataset.json (the loadable ones, barring damage)."""
        return dataset_tables.names(self.loc)

    def dataset_folders(self) -> list[str]:
        """Every folder under datasets/, whole or not (what `store verify` checks)."""
        return dataset_tables.folders(self.loc)

    def dataset_folder(self, name: str) -> str:
        """The name, validated, of an existing dataset folder (loadable or not); a one-line error otherwise."""
        return dataset_tables.folder(self.loc, name)

    def save_dataset(self, ds: PairDataset, *, replace: bool = False) -> bool:
        """Store a dataset's tables; True if written, False if the identical dataset was already there."""
        self.require_writable()
        self._datasets.pop(ds.name, None)
        return dataset_tables.save(self.loc, ds, replace=replace)

    def dataset_meta(self, name: str) -> dict[str, Any]:
        """A dataset's dataset.json (fingerprints, sizes, classes, templates), read without decoding its tables."""
        return dataset_tables.read_meta(self.loc, name)

    def dataset(self, name: str) -> PairDataset:
        """Load a dataset; a missing dataset.json, unreadable tables or a size mismatch are one-line errors.

        Its tables are decoded once per store object and dataset version: dataset.json is read on every call, and
        the dataset loaded before is handed out again while it names the same fingerprint (callers share it: they
        read it, never change it)."""
        meta = dataset_tables.read_meta(self.loc, name)
        held = self._datasets.get(name)
        if held is not None and meta.get("fingerprint") is not None and held.meta.get("fingerprint") == meta[
                "fingerprint"]:
            return held
        ds = dataset_tables.load(self.loc, name, meta)
        self._datasets[name] = ds
        return ds

    def remove_dataset(self, name: str) -> None:
        """Remove a dataset folder (loadable or not): dataset.json first, so a crash leaves it unloadable."""
        self.require_writable()
        self._datasets.pop(name, None)
        dataset_tables.remove(self.loc, name)

    # ----- feature entries
    def entry_folders(self) -> list[str]:
        """Every folder under features/: readable entries and broken ones alike."""
        return self.loc.listdirs("features")

    def entry_exists(self, key: str) -> bool:
        """Does features/<key> hold an entry's metadata (readable or not)? Nothing is validated or read."""
        return self.loc.exists("features", key, "zarr.json")

    def entry_folder(self, key: str) -> str:
        """The key, validated, of an existing entry folder (readable or not, or a symlink in its place); a one-line
        error otherwise."""
        validate_key(key, "entry key")
        if self.loc.link_target("features", key) is not None:
            return key
        if not self.loc.isdir("features", key):
            raise StratalignError(f"no feature entry {key!r} in {self.url}")
        return key

    def entry(self, key: str) -> FeatureEntry:
        """The readable entry in features/<key>; a one-line error says why it is not one."""
        self.entry_folder(key)
        linked = self.loc.link_target("features", key)
        if linked is not None:
            raise StratalignError(f"features/{key} in {self.url} is a symlink (to {linked}): a store keeps no links; "
                                  f"replace it by the folder itself, or remove the link with `stratalign store rm {key}`")
        if not self.loc.exists("features", key, "zarr.json"):
            raise StratalignError(f"features/{key} in {self.url} has no zarr.json (entry metadata missing)")
        node = self.loc.read_json("features", key, "zarr.json")
        meta = node.get("attributes", {}).get("stratalign_entry") if isinstance(node, dict) else None
        if not isinstance(meta, dict):
            raise StratalignError(f"features/{key} in {self.url} is not a stratalign entry (no entry metadata)")
        if meta.get("format_version") not in ENTRY_FORMATS:
            raise StratalignError(
                f"entry {key} has format version {meta.get('format_version')} (stratalign "
                f"{meta.get('stratalign_version')}); this stratalign reads versions {ENTRY_FORMATS}"
            )
        if meta.get("key") != key:
            raise StratalignError(f"features/{key} holds the metadata of entry {meta.get('key')!r} (moved folder?)")
        try:
            spec = EntrySpec.from_json(meta)
            group = self.root[f"features/{key}"]
        except StratalignError:
            raise
        except Exception as exc:
            raise StratalignError(f"entry {key} is unreadable: {type(exc).__name__}: {exc}") from None
        return FeatureEntry(self, spec, group, key)

    def scan_entries(self) -> list[tuple[str, FeatureEntry | None, str | None]]:
        """(key, entry, None) for each readable entry folder, (key, None, why) for each broken one and each symlink
        in features/ (reported, never followed nor skipped): features/ listed afresh (what verify, repair and
        `store ls` read), and held as this object's listing."""
        out: list[tuple[str, FeatureEntry | None, str | None]] = []
        for key in sorted(self.entry_folders() + self.loc.linked("features")):
            try:
                out.append((key, self.entry(key), None))
            except StratalignError as exc:
                out.append((key, None, str(exc)))
        self._listing = out
        return out

    def entries(self, *, fresh: bool = False) -> Iterator[FeatureEntry]:
        """The readable entries (broken ones are listed by `scan_entries` and `store verify`), from the listing this
        object holds (features/ is scanned on first use, after this object's writes, or when `fresh`)."""
        listing = self._listing if self._listing is not None and not fresh else self.scan_entries()
        for _, entry, _ in listing:
            if entry is not None:
                yield entry

    def reusable_twin(self, spec: EntrySpec) -> FeatureEntry | None:
        """A complete entry of the same content in another layout (e.g. one written before layout 2), which an
        extraction asking for `spec` reuses rather than encoding everything again; None when there is none."""
        if self.entry_exists(spec.key):
            return None
        for twin in spec.twins():
            if self.entry_exists(twin.key):
                entry = self.entry(twin.key)
                if entry.is_complete():
                    return entry
        return None

    def create_entry(self, spec: EntrySpec) -> FeatureEntry:
        """Create an entry (or open the identical existing one, or a complete one of the same content in another
        layout: `reusable_twin`): arrays first, metadata attrs last.

        zarr creates the first layer's array; the others get its metadata document (zarr's own `to_dict`)
        with their own shape, chunks and layer name, written as one small file each.
        Creating 17 arrays through zarr took ~0.1 s (its async round trips per array), the first batch's
        whole forward pass for a small model; the copies take a few ms."""
        self.require_writable()
        self._listing = None
        twin = self.reusable_twin(spec)
        if twin is not None:
            return twin
        key = spec.key
        for sub in ("_shards", "_claims", *(f"layer_{i:03d}" for i in range(len(spec.dims)))):
            self.loc.refuse_links("features", key, sub)  # zarr would write through a link: refused before any work
        for parts in (("features",), ("features", key), *(("features", key, f"layer_{i:03d}") for i in
                                                           range(len(spec.dims)))):
            if self.loc.exists(*parts, "zarr.json"):  # a corrupt metadata file is named, not a JSONDecodeError
                self.loc.read_json(*parts, "zarr.json")
        features = self.root.require_group("features")
        try:
            group = features.create_group(key)
        except (ContainsGroupError, ContainsArrayError):
            group = features[key]
        created: dict[int, zarr.Array] = {}
        template: dict[str, Any] | None = None
        for i, dim in enumerate(spec.dims):
            name = f"layer_{i:03d}"
            if template is not None and not self.loc.exists("features", key, name, "zarr.json"):
                self.loc.write_bytes(_array_metadata(template, (spec.rows, dim), (spec.shard_rows, dim),
                                                     spec.layer_names[i], spec.chunk_rows), "features", key, name,
                                     "zarr.json", durable=False)  # as zarr writes its own metadata
                continue
            sharded = spec.format_version == LAYOUT_SHARDED
            try:
                created[i] = group.create_array(
                    name, shape=(spec.rows, dim), dtype=spec.dtype,
                    chunks=(spec.chunk_rows, dim) if sharded else (spec.shard_rows, dim),
                    shards=(spec.shard_rows, dim) if sharded else None,
                    serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=float("nan"),
                    attributes={"layer_name": spec.layer_names[i]},
                )
                template = created[i].metadata.to_dict()
            except (ContainsArrayError, ContainsGroupError):
                arr = group[name]
                if arr.shape != (spec.rows, dim) or str(arr.dtype) != spec.dtype:
                    raise StratalignError(f"entry {key} layer {i} exists with another shape or dtype") from None
        if not isinstance(group.attrs.get("stratalign_entry"), dict):
            group.attrs["stratalign_entry"] = spec.to_json()
        entry = self.entry(key)
        entry.keep_arrays(created)
        for parts in (("features", key), ("features", key, "_shards"), ("features", key, "_claims")):
            cleanup.clean_folder(self.loc, *parts)  # temp files a killed writer left (see store.cleanup)
        return entry

    def complete_entries(self, dataset: str, encoder: str, pooling: str | None = None,
                         modality: str | None = None, precision: str | None = None) -> list[FeatureEntry]:
        """Every complete entry of (dataset, encoder spec[, pooling][, forward precision]) of the dataset's content
        (dataset.json's fingerprint), from the listing held (listed again when none is complete); fp32 first."""
        content = self.dataset_meta(dataset).get("content_fingerprint")
        for fresh in (False, True)[:1 + (self._listing is not None)]:  # held: listed again if it has none complete
            matches = [e for e in self.entries(fresh=fresh)
                       if e.spec.dataset == dataset and e.spec.encoder_spec == encoder
                       and (pooling is None or e.spec.pooling == pooling)
                       and (modality is None or e.spec.modality == modality)
                       and (precision is None or e.spec.precision == precision)
                       and e.spec.content_fingerprint == content]
            complete = [e for e in matches if e.is_complete()]
            if complete:
                break
        flag = "" if precision in (None, "fp32") else f" --precision {precision}"
        hint = f"stratalign extract --dataset {dataset} --encoder {encoder}{flag}"
        if not matches and modality is not None:
            refuse_other_modality(self, dataset, encoder, modality, content)
        if not matches:
            how = (f" with pooling {pooling}" if pooling else "") + (f" from a {precision} forward" if precision else "")
            raise StratalignError(f"no features of {encoder} for dataset {dataset!r}{how}; run: {hint}")
        if not complete:
            raise StratalignError(f"features of {encoder} for {dataset!r} are incomplete; finish them with: {hint}")
        # fp32 forwards before other precisions, then the newest layout first (stable: key order otherwise)
        complete.sort(key=lambda e: (e.spec.precision != "fp32", -e.spec.format_version))
        if pooling is None:  # prefer the encoder's default pooling
            default = [e for e in complete if e.spec.pooling == e.spec.encoder.get("default_pooling")]
            complete = default + [e for e in complete if e not in default]
        return complete

    def find_entry(self, dataset: str, encoder: str, pooling: str | None = None,
                   modality: str | None = None, precision: str | None = None) -> FeatureEntry:
        """The complete entry of (dataset, encoder spec[, pooling][, precision]) matching the dataset's content."""
        return self.complete_entries(dataset, encoder, pooling, modality, precision)[0]

    def features(self, dataset: str, encoder: str, layer: int | str, pooling: str | None = None,
                 rows: np.ndarray | None = None) -> np.ndarray:
        """One layer of cached features as a numpy array (rows aligned with the dataset's table)."""
        return self.find_entry(dataset, encoder, pooling).read_layer(layer, rows)

    def remove_entry(self, key: str) -> None:
        """Remove an entry folder, readable or not (the key is validated: no path escapes)."""
        self.require_writable()
        self.entry_folder(key)
        self._listing = None
        if self.loc.link_target("features", key) is not None:
            self.loc.unlink("features", key)  # the link, never what it points to
            return
        self.loc.remove("features", key, recursive=True)

    def entry_table(self) -> pl.DataFrame:
        """One row per entry folder, broken ones included: what `stratalign store ls` shows (store.inventory)."""
        from stratalign.store.inventory import entry_table

        return entry_table(self)

