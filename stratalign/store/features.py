"""The feature store: a Zarr v3 hierarchy that caches every layer's pooled features for a whole team.

Layout under the store root (a local path or any fsspec URL):

    zarr.json                          root group; attrs["stratalign"] marks a stratalign store + format version
    datasets/<name>/dataset.json       dataset meta (fingerprints, source, classes, skipped rows)
    datasets/<name>/images.parquet     image table (rows = image feature rows)
    datasets/<name>/captions.parquet   caption table (rows = caption feature rows)
    features/<entry key>/              one Zarr group per (dataset content, encoder, pooling, dtype)
        layer_000 ... layer_NNN        (rows, dim_l) arrays, one row-chunk per shard, crc32c-checksummed
        _shards/<s>.json               completion marker: row range + sha256 of each layer's shard bytes
        _claims/<s>.json               a worker's claim on a shard while it encodes it
    runs/<run id>/                     trained heads (see store.runs)
    layers/<key>.json, <key>.png       layer-similarity results and heatmaps (see store.layer_results)
    choices/<dataset>--<v>--<t>.json   the recorded layer choice for `train --layers auto`
    graphs/<key>.safetensors           cached kNN graphs of clip+structure-knn subsets (see store.graphs)

Entry keys are content addresses: a hash of everything that determines the bytes (dataset name and content
fingerprint, encoder identity and weights hash, preprocessing, pooling, dtype, shard size, format version),
so changing any input makes a new entry and never a stale hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ContainsArrayError, ContainsGroupError

import stratalign
from stratalign.errors import StratalignError, preview
from stratalign.store import claims as claims_mod
from stratalign.store.datasets import PairDataset
from stratalign.store.location import Location, default_store_url, validate_key

FORMAT_VERSION = 1
STORE_TAG = "stratalign-store"
DEFAULT_SHARD_ROWS = 1024
FLOAT16_MAX = float(np.finfo(np.float16).max)
MODALITIES = ("image", "text")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "x"


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_sha(block: np.ndarray) -> str:
    """sha256 of a shard block's bytes as stored (little-endian, C order)."""
    return hashlib.sha256(np.ascontiguousarray(block.astype(block.dtype.newbyteorder("<"))).tobytes()).hexdigest()


@dataclass(frozen=True)
class EntrySpec:
    """Everything that determines an entry's bytes; its hash is the entry key."""

    dataset: str
    content_fingerprint: str
    modality: str
    encoder: dict[str, Any]  # JSON metadata from the encoder: spec, weights_sha256, preprocessing, ...
    pooling: str
    layer_names: tuple[str, ...]
    dims: tuple[int, ...]
    rows: int
    dtype: str = "float16"
    shard_rows: int = DEFAULT_SHARD_ROWS

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise StratalignError(f"unknown modality {self.modality!r}; use one of {MODALITIES}")
        if self.dtype not in ("float16", "float32"):
            raise StratalignError(f"unsupported feature dtype {self.dtype!r}: use float16 or float32")
        if len(self.layer_names) != len(self.dims) or not self.dims:
            raise StratalignError("an entry needs one dim per layer name and at least one layer")
        if self.rows < 1 or self.shard_rows < 1:
            raise StratalignError(f"bad entry size: rows={self.rows}, shard_rows={self.shard_rows}")

    @property
    def encoder_spec(self) -> str:
        return str(self.encoder["spec"])

    @property
    def n_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def identity(self) -> dict[str, Any]:
        """What the key hashes: the exact dataset name too (the key's readable slug is lossy)."""
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "content_fingerprint": self.content_fingerprint,
            "modality": self.modality,
            "encoder": self.encoder,
            "pooling": self.pooling,
            "layer_names": list(self.layer_names),
            "dims": list(self.dims),
            "rows": self.rows,
            "dtype": self.dtype,
            "shard_rows": self.shard_rows,
        }

    @property
    def key(self) -> str:
        h = _canonical_hash(self.identity())[:16]
        return f"{_slug(self.dataset)}--{self.modality}--{_slug(self.encoder_spec)}--{self.pooling}--{h}"

    def to_json(self) -> dict[str, Any]:
        return {**self.identity(), "dataset": self.dataset, "key": self.key,
                "stratalign_version": stratalign.__version__}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "EntrySpec":
        return cls(dataset=meta["dataset"], content_fingerprint=meta["content_fingerprint"],
                   modality=meta["modality"], encoder=meta["encoder"], pooling=meta["pooling"],
                   layer_names=tuple(meta["layer_names"]), dims=tuple(meta["dims"]), rows=int(meta["rows"]),
                   dtype=meta["dtype"], shard_rows=int(meta["shard_rows"]))


async def _write_chunks(arrays: list[Any], rows: slice, blocks: list[np.ndarray]) -> None:
    """One shard's chunk of every layer, written concurrently on zarr's event loop (one after the other,
    each write waited for its own round trip: ~2.5 ms a layer on a local disk, more on object stores)."""
    await asyncio.gather(*(a.setitem(rows, b) for a, b in zip(arrays, blocks)))


def _array_metadata(template: dict[str, Any], shape: tuple[int, int], chunks: tuple[int, int], layer_name: str) -> bytes:
    """zarr.json of an array like `template` (another layer's `metadata.to_dict()`) with its own shape, chunks
    and name, serialised as zarr's `to_buffer_dict` does (a round trip through ArrayV3Metadata cost ~1 ms a
    layer, most of creating an entry)."""
    doc = {**template, "shape": list(shape), "attributes": {"layer_name": layer_name},
           "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}
    return json.dumps(doc, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


class FeatureEntry:
    """One entry: per-layer arrays written in whole shards, each shard with a completion marker."""

    def __init__(self, store: "FeatureStore", spec: EntrySpec, group: zarr.Group, key: str | None = None) -> None:
        self.store = store
        self.spec = spec
        self.group = group
        self.key = key or spec.key  # the folder it lives in (entries keyed by an older derivation keep theirs)
        self._markers: dict[int, dict] | None = None
        self._arrays: dict[int, zarr.Array] = {}  # opened once: each open reads and parses zarr.json

    # ----- layout helpers
    @property
    def folder(self) -> tuple[str, str]:
        return ("features", self.key)

    def layer_array(self, layer: int) -> zarr.Array:
        """One layer's Zarr array; a corrupt zarr.json is named in a one-line error."""
        if layer in self._arrays:
            return self._arrays[layer]
        name = f"layer_{layer:03d}"
        try:
            self._arrays[layer] = self.group[name]
            return self._arrays[layer]
        except json.JSONDecodeError as exc:
            path = self.store.loc.path(*self.folder, name, "zarr.json")
            raise StratalignError(f"corrupt JSON file {path}: {exc}") from None

    def open_arrays(self) -> list[zarr.Array]:
        """Every layer's array, opened once (the writer thread does it before the first shard is ready)."""
        return [self.layer_array(i) for i in range(len(self.spec.dims))]

    def shard_rows_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.spec.shard_rows
        return start, min(start + self.spec.shard_rows, self.spec.rows)

    def resolve_layer(self, layer: int | str) -> int:
        """A layer index (negative counts from the end) or name -> index, with a clear error."""
        n = len(self.spec.dims)
        if isinstance(layer, str):
            if layer in self.spec.layer_names:
                return self.spec.layer_names.index(layer)
            try:
                layer = int(layer)
            except ValueError:
                raise StratalignError(
                    f"layer {layer!r} not in {self.spec.encoder_spec}; layers: {preview(self.spec.layer_names, 20)}"
                ) from None
        if not -n <= layer < n:
            raise StratalignError(
                f"layer index {layer} out of range for {self.spec.encoder_spec} ({n} layers: valid 0..{n - 1} or -1..-{n})"
            )
        return layer % n

    # ----- markers
    def markers(self, refresh: bool = False) -> dict[int, dict]:
        if self._markers is None or refresh:
            loc = self.store.loc
            found = {}
            for name in loc.listdir(*self.folder, "_shards"):
                if name.endswith(".json") and name[:-5].isdigit():
                    found[int(name[:-5])] = loc.read_json(*self.folder, "_shards", name)
            self._markers = found
        return self._markers

    def bad_rows(self) -> np.ndarray:
        """Sorted rows that `extract --skip-bad` encoded as blank placeholders (union over the shard markers)."""
        rows = [r for s, m in self.markers().items() if s < self.spec.n_shards for r in (m.get("bad_rows") or [])]
        out = np.unique(np.asarray(rows, dtype=np.int64))
        if out.size and (out[0] < 0 or out[-1] >= self.spec.rows):
            raise StratalignError(f"shard markers of {self.key} list bad rows outside 0..{self.spec.rows - 1}; "
                                  "run `stratalign store verify`")
        return out

    def done_shards(self) -> list[int]:
        return sorted(s for s in self.markers(refresh=True) if s < self.spec.n_shards)

    def pending_shards(self) -> list[int]:
        done = set(self.done_shards())
        return [s for s in range(self.spec.n_shards) if s not in done]

    def is_complete(self) -> bool:
        return not self.pending_shards()

    def shard_done(self, shard: int, refresh: bool = False) -> bool:
        """Does the shard's completion marker exist? `refresh` drops the filesystem's cached listing first
        (object stores cache listings; a marker another worker just wrote must be seen)."""
        loc = self.store.loc
        if refresh:
            loc.fs.invalidate_cache(loc.path(*self.folder, "_shards"))
        return loc.exists(*self.folder, "_shards", f"{shard}.json")

    # ----- writing
    @property
    def claims_folder(self) -> str:
        """The folder of this entry's shard claims (see store.claims)."""
        return "/".join([*self.folder, "_claims"])

    def claim(self, shard: int, claim: claims_mod.Claim) -> bool:
        """Claim a pending shard for this worker (False if done or held by a live worker)."""
        if self.shard_done(shard):
            return False
        return claims_mod.try_claim(self.store.loc, self.claims_folder, shard, claim)

    def release(self, shard: int, claim: claims_mod.Claim) -> None:
        claims_mod.release(self.store.loc, self.claims_folder, shard, claim)

    def write_shard(self, shard: int, layers: Sequence[np.ndarray], info: dict[str, Any] | None = None) -> None:
        """Write all layers of one shard, then its completion marker (the marker is written last).

        Values are checked before anything is written: NaN/inf fail, and values that do not fit float16
        fail with a hint to use float32 (never an inf in the store).
        """
        spec = self.spec
        if not 0 <= shard < spec.n_shards:
            raise StratalignError(f"shard {shard} out of range for entry {self.key} ({spec.n_shards} shards)")
        start, stop = self.shard_rows_range(shard)
        if len(layers) != len(spec.dims):
            raise StratalignError(f"shard {shard} of {self.key}: got {len(layers)} layers, expected {len(spec.dims)}")
        blocks = []
        for i, (block, dim) in enumerate(zip(layers, spec.dims)):
            block = np.asarray(block, dtype=np.float32)
            if block.shape != (stop - start, dim):
                raise StratalignError(
                    f"shard {shard} layer {i} of {self.key}: shape {block.shape}, expected {(stop - start, dim)}"
                )
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = (np.flatnonzero(~finite) + start).tolist()
                raise StratalignError(
                    f"NaN/inf features from {spec.encoder_spec} layer {spec.layer_names[i]} at rows {preview(bad)}"
                )
            if spec.dtype == "float16":
                peak = float(np.abs(block).max(initial=0.0))
                if peak > FLOAT16_MAX:
                    raise StratalignError(
                        f"{spec.encoder_spec} layer {spec.layer_names[i]} has values up to {peak:.3g}, beyond float16 "
                        f"(max {FLOAT16_MAX:.0f}); re-run extract with --dtype float32"
                    )
            blocks.append(block.astype(spec.dtype))
        arrays = self.open_arrays()
        zarr_sync(_write_chunks([a.async_array for a in arrays], slice(start, stop), blocks))
        marker = {"shard": shard, "rows": [start, stop], "sha256": [shard_sha(b) for b in blocks],
                  "written_at": time.time(), **(info or {})}
        self.store.loc.write_json(marker, *self.folder, "_shards", f"{shard}.json")
        if self._markers is not None:
            self._markers[shard] = marker

    # ----- reading
    def read_layer(self, layer: int | str, rows: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """One layer's features (all rows, or the given rows), checked against the shard markers."""
        idx = self.resolve_layer(layer)
        pending = self.pending_shards()
        if pending:
            raise StratalignError(
                f"entry {self.key} is incomplete ({len(pending)} of {self.spec.n_shards} shards missing); "
                f"finish it with: stratalign extract --dataset {self.spec.dataset} --encoder {self.spec.encoder_spec}"
            )
        try:
            data = self.layer_array(idx)[...]
        except ValueError as exc:  # zarr's checksum mismatch
            raise StratalignError(f"corrupt chunk in {self.key} layer {idx}: {exc}") from None
        if verify:
            markers = self.markers()
            for s in range(self.spec.n_shards):
                start, stop = self.shard_rows_range(s)
                if shard_sha(data[start:stop]) != markers[s]["sha256"][idx]:
                    raise StratalignError(
                        f"shard {s} of {self.key} layer {idx} does not match its checksum: run `stratalign store verify`"
                    )
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= self.spec.rows):
                raise StratalignError(f"row index out of range for {self.key} ({self.spec.rows} rows)")
            data = data[rows]
        return data

    def verify(self) -> dict[str, list]:
        """Re-read every chunk: {'corrupt': [(shard, layer, why)], 'incomplete': [shard, ...]}."""
        markers = self.markers(refresh=True)
        report: dict[str, list] = {"corrupt": [], "incomplete": []}
        for s in range(self.spec.n_shards):
            if s not in markers:
                report["incomplete"].append(s)
                continue
            start, stop = self.shard_rows_range(s)
            for layer in range(len(self.spec.dims)):
                try:
                    block = self.layer_array(layer)[start:stop]
                except Exception as exc:  # checksum mismatch, undecodable or missing metadata
                    report["corrupt"].append((s, layer, f"{type(exc).__name__}: {str(exc)[:80]}"))
                    continue
                if shard_sha(block) != markers[s]["sha256"][layer]:
                    report["corrupt"].append((s, layer, "sha256 mismatch"))
        return report


class FeatureStore:
    """A stratalign store. Open an existing one with `FeatureStore.open(url, mode="r"|"a")`; create one with
    `FeatureStore.open(url, mode="a", create=True)` (what `ingest` and `demo` do)."""

    def __init__(self, loc: Location, root: zarr.Group, mode: str) -> None:
        self.loc = loc
        self.root = root
        self.mode = mode

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
        if not loc.exists("zarr.json"):
            if not create:
                raise StratalignError(f"no stratalign store at {url}; create one with `stratalign ingest ...`")
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
            raise StratalignError(f"{loc.url} is a non-empty folder that is not a stratalign store; use another --store")
        root = zarr.open_group(store=loc.url, mode="a")
        root.attrs["stratalign"] = {"kind": STORE_TAG, "format_version": FORMAT_VERSION,
                                    "created_by": stratalign.__version__}
        root.require_group("features")
        return cls(loc, root, "a")

    def _writable(self) -> None:
        if self.mode != "a":
            raise StratalignError(f"store {self.url} is open read-only")

    # ----- datasets
    def datasets(self) -> list[str]:
        """Names of the datasets that have a dataset.json (the loadable ones, barring damage)."""
        return [n for n in self.loc.listdir("datasets") if self.loc.exists("datasets", n, "dataset.json")]

    def dataset_folders(self) -> list[str]:
        """Every folder under datasets/, whole or not (what `store verify` checks)."""
        return self.loc.listdirs("datasets")

    def dataset_folder(self, name: str) -> str:
        """The name, validated, of an existing dataset folder (loadable or not); a one-line error otherwise."""
        validate_key(name, "dataset name")
        if not self.loc.isdir("datasets", name):
            raise StratalignError(f"dataset {name!r} not in store {self.url}; known: "
                                  f"{', '.join(self.dataset_folders()) or 'none'}")
        return name

    def _fingerprint_of(self, name: str, replace: bool) -> str | None:
        """The stored fingerprint of a dataset (None if absent, or unreadable while replacing it)."""
        if not self.loc.exists("datasets", name, "dataset.json"):
            return None
        try:
            meta = self.loc.read_json("datasets", name, "dataset.json")
        except StratalignError:
            if replace:
                return None
            raise
        return str(meta.get("fingerprint", "?")) if isinstance(meta, dict) else "?"

    def save_dataset(self, ds: PairDataset, *, replace: bool = False) -> bool:
        """Store a dataset's tables; True if written, False if the identical dataset was already there.

        dataset.json marks a dataset whole: when replacing, the old one is removed before any table is
        written and the new one is written last, so a crash leaves the old dataset or one that refuses to load.
        """
        self._writable()
        validate_key(ds.name, "dataset name")
        old = self._fingerprint_of(ds.name, replace)
        if old == ds.fingerprint:
            return False
        if old is not None and not replace:
            raise StratalignError(
                f"dataset {ds.name!r} already exists in {self.url} with different content "
                f"(fingerprint {old[:12]} vs {ds.fingerprint[:12]}); choose another --name or pass --replace"
            )
        self.loc.remove("datasets", ds.name, "dataset.json")
        for table, frame in (("images", ds.images), ("captions", ds.captions)):
            buf = io.BytesIO()
            frame.write_parquet(buf)
            self.loc.write_bytes(buf.getvalue(), "datasets", ds.name, f"{table}.parquet")
        meta = {**ds.meta, "format_version": FORMAT_VERSION, "stratalign_version": stratalign.__version__,
                "n_images": ds.images.height, "n_captions": ds.captions.height}
        self.loc.write_json(meta, "datasets", ds.name, "dataset.json")  # written last: marks the dataset whole
        return True

    def dataset(self, name: str) -> PairDataset:
        """Load a dataset; a missing dataset.json, unreadable tables or a size mismatch are one-line errors."""
        validate_key(name, "dataset name")
        if not self.loc.exists("datasets", name, "dataset.json"):
            if self.loc.isdir("datasets", name):
                raise StratalignError(
                    f"dataset {name!r} in {self.url} has no dataset.json (interrupted ingest or replace); "
                    f"ingest it again, or remove it with `stratalign store rm --dataset {name}`"
                )
            known = self.datasets()
            raise StratalignError(
                f"dataset {name!r} not in store {self.url}; known: {', '.join(known) or 'none'} "
                f"(ingest it with `stratalign ingest`)"
            )
        meta = self.loc.read_json("datasets", name, "dataset.json")
        if not isinstance(meta, dict):
            raise StratalignError(f"dataset {name!r}: {self.loc.path('datasets', name, 'dataset.json')} is not an object")
        try:
            images = pl.read_parquet(io.BytesIO(self.loc.read_bytes("datasets", name, "images.parquet")))
            captions = pl.read_parquet(io.BytesIO(self.loc.read_bytes("datasets", name, "captions.parquet")))
        except Exception as exc:
            raise StratalignError(f"dataset {name!r} tables are unreadable: {type(exc).__name__}: {exc}") from None
        if images.height != meta.get("n_images") or captions.height != meta.get("n_captions"):
            raise StratalignError(f"dataset {name!r} tables do not match its dataset.json (truncated store?)")
        return PairDataset(name=name, images=images, captions=captions, meta=meta)

    def remove_dataset(self, name: str) -> None:
        """Remove a dataset folder (loadable or not): dataset.json first, so a crash leaves it unloadable."""
        self._writable()
        self.dataset_folder(name)
        self.loc.remove("datasets", name, "dataset.json")
        self.loc.remove("datasets", name, recursive=True)

    # ----- feature entries
    def entry_folders(self) -> list[str]:
        """Every folder under features/: readable entries and broken ones alike."""
        return self.loc.listdirs("features")

    def entry_folder(self, key: str) -> str:
        """The key, validated, of an existing entry folder (readable or not); a one-line error otherwise."""
        validate_key(key, "entry key")
        if not self.loc.isdir("features", key):
            raise StratalignError(f"no feature entry {key!r} in {self.url}")
        return key

    def entry(self, key: str) -> FeatureEntry:
        """The readable entry in features/<key>; a one-line error says why it is not one."""
        self.entry_folder(key)
        if not self.loc.exists("features", key, "zarr.json"):
            raise StratalignError(f"features/{key} in {self.url} has no zarr.json (entry metadata missing)")
        node = self.loc.read_json("features", key, "zarr.json")
        meta = node.get("attributes", {}).get("stratalign_entry") if isinstance(node, dict) else None
        if not isinstance(meta, dict):
            raise StratalignError(f"features/{key} in {self.url} is not a stratalign entry (no entry metadata)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StratalignError(
                f"entry {key} has format version {meta.get('format_version')} (stratalign "
                f"{meta.get('stratalign_version')}); this stratalign reads version {FORMAT_VERSION}"
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
        """(key, entry, None) for each readable entry folder, (key, None, why) for each broken one."""
        out: list[tuple[str, FeatureEntry | None, str | None]] = []
        for key in self.entry_folders():
            try:
                out.append((key, self.entry(key), None))
            except StratalignError as exc:
                out.append((key, None, str(exc)))
        return out

    def entries(self) -> Iterator[FeatureEntry]:
        """The readable entries (broken ones are listed by `scan_entries` and `store verify`)."""
        for _, entry, _ in self.scan_entries():
            if entry is not None:
                yield entry

    def create_entry(self, spec: EntrySpec) -> FeatureEntry:
        """Create an entry (or open the identical existing one): arrays first, metadata attrs last.

        zarr creates the first layer's array; the others get its metadata document (zarr's own `to_dict`)
        with their own shape, chunks and layer name, written as one small file each.
        Creating 17 arrays through zarr took ~0.1 s (its async round trips per array), the first batch's
        whole forward pass for a small model; the copies take a few ms."""
        self._writable()
        key = spec.key
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
                                                     spec.layer_names[i]), "features", key, name, "zarr.json",
                                     durable=False)  # as zarr writes its own metadata
                continue
            try:
                created[i] = group.create_array(
                    name, shape=(spec.rows, dim), chunks=(spec.shard_rows, dim), dtype=spec.dtype,
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
        entry._arrays.update(created)
        return entry

    def complete_entries(self, dataset: str, encoder: str, pooling: str | None = None,
                         modality: str | None = None) -> list[FeatureEntry]:
        """Every complete entry of (dataset, encoder spec[, pooling]) matching the dataset's current content."""
        ds_meta = self.dataset(dataset).meta
        matches = [
            e for e in self.entries()
            if e.spec.dataset == dataset and e.spec.encoder_spec == encoder
            and (pooling is None or e.spec.pooling == pooling)
            and (modality is None or e.spec.modality == modality)
            and e.spec.content_fingerprint == ds_meta["content_fingerprint"]
        ]
        hint = f"stratalign extract --dataset {dataset} --encoder {encoder}"
        if not matches:
            raise StratalignError(f"no features of {encoder} for dataset {dataset!r}"
                                  f"{f' with pooling {pooling}' if pooling else ''}; run: {hint}")
        complete = [e for e in matches if e.is_complete()]
        if not complete:
            raise StratalignError(f"features of {encoder} for {dataset!r} are incomplete; finish them with: {hint}")
        if pooling is None:  # prefer the encoder's default pooling
            default = [e for e in complete if e.spec.pooling == e.spec.encoder.get("default_pooling")]
            complete = default + [e for e in complete if e not in default]
        return complete

    def find_entry(self, dataset: str, encoder: str, pooling: str | None = None,
                   modality: str | None = None) -> FeatureEntry:
        """The complete entry of (dataset, encoder spec[, pooling]) matching the dataset's current content."""
        return self.complete_entries(dataset, encoder, pooling, modality)[0]

    def features(self, dataset: str, encoder: str, layer: int | str, pooling: str | None = None,
                 rows: np.ndarray | None = None) -> np.ndarray:
        """One layer of cached features as a numpy array (rows aligned with the dataset's table)."""
        return self.find_entry(dataset, encoder, pooling).read_layer(layer, rows)

    def remove_entry(self, key: str) -> None:
        """Remove an entry folder, readable or not (the key is validated: no path escapes)."""
        self._writable()
        self.entry_folder(key)
        self.loc.remove("features", key, recursive=True)

    def entry_table(self) -> pl.DataFrame:
        """One row per entry folder, broken ones included: what `stratalign store ls` shows."""
        rows = []
        for key, e, why in self.scan_entries():
            row: dict[str, Any] = {"key": key, "bytes": self.loc.size("features", key)}
            if e is not None:
                try:
                    row["shards"] = f"{len(e.done_shards())}/{e.spec.n_shards}"
                except StratalignError as exc:  # e.g. a corrupt shard marker
                    why = str(exc)
                row.update({
                    "dataset": e.spec.dataset, "modality": e.spec.modality,
                    "encoder": e.spec.encoder_spec, "pooling": e.spec.pooling, "layers": len(e.spec.dims),
                    "dim": "/".join(str(d) for d in sorted(set(e.spec.dims))), "rows": e.spec.rows,
                    "dtype": e.spec.dtype,
                })
            row["status"] = "ok" if why is None else f"broken: {why}"
            rows.append(row)
        schema = {"key": pl.String, "dataset": pl.String, "modality": pl.String, "encoder": pl.String,
                  "pooling": pl.String, "layers": pl.Int64, "dim": pl.String, "rows": pl.Int64,
                  "dtype": pl.String, "shards": pl.String, "bytes": pl.Int64, "status": pl.String}
        return pl.DataFrame(rows, schema=schema)
