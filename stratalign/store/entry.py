"""A feature entry: one (dataset content, encoder, pooling, dtype) group of per-layer arrays in the store.

`EntrySpec` is everything that determines an entry's bytes (its hash is the entry key, see store.keys);
`FeatureEntry` writes and reads the entry in whole shards, each with a completion marker written last,
and holds the claims through which several workers share it (see store.claims).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from stratalign.errors import StratalignError, preview
from stratalign.store import claims as claims_mod
from stratalign.store.codecs import check_codecs
from stratalign.store.keys import entry_key
from stratalign.store.shard_format import ByteSource, ShardCorrupt, ShardGeometry, encode_shard, open_below, read_rows
from stratalign.version import __version__

if TYPE_CHECKING:
    from stratalign.store.feature_store import FeatureStore

DEFAULT_SHARD_ROWS = 1024
# Entry layouts (the `format_version` an entry key hashes): 1 = one Zarr chunk per shard (a read of any row
# decodes and checks whole shards); 2 = one Zarr shard per extraction shard, cut into inner chunks of
# `chunk_rows` rows with a crc32c each (store.shard_format: a read of r rows touches O(r) bytes).
LAYOUT_CHUNK = 1
LAYOUT_SHARDED = 2
ENTRY_FORMATS = (LAYOUT_CHUNK, LAYOUT_SHARDED)
DEFAULT_CHUNK_ROWS = 4  # rows per inner chunk of layout 2: 8 KB at 1024-d float16
FLOAT16_MAX = float(np.finfo(np.float16).max)
MODALITIES = ("image", "text")


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
    format_version: int = LAYOUT_CHUNK  # the entry layout; new extractions ask for LAYOUT_SHARDED
    chunk_rows: int = 0  # layout 2's inner chunk rows (0: gcd(shard_rows, DEFAULT_CHUNK_ROWS)); unused by layout 1
    # the layout the key was derived under when it is not this one: an entry migrated from layout 1 keeps its key
    # (store.migrate), so the runs, layer results and graphs that name it still find it
    key_layout: int | None = None

    def __post_init__(self) -> None:
        if self.format_version not in ENTRY_FORMATS:
            raise StratalignError(f"unknown entry format {self.format_version!r}: use one of {ENTRY_FORMATS}")
        if self.key_layout is not None and not (self.key_layout in ENTRY_FORMATS and self.key_layout < self.format_version):
            raise StratalignError(f"key layout {self.key_layout!r} must be an older layout than {self.format_version}")
        if self.format_version == LAYOUT_CHUNK:
            object.__setattr__(self, "chunk_rows", 0)
        elif self.chunk_rows == 0:
            object.__setattr__(self, "chunk_rows", math.gcd(self.shard_rows, DEFAULT_CHUNK_ROWS))
        if self.chunk_rows < 0 or (self.chunk_rows and self.shard_rows % self.chunk_rows):
            raise StratalignError(f"chunk rows {self.chunk_rows} must divide the shard rows {self.shard_rows}")
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
        """What the key hashes: the exact dataset name too (the key's readable slug is lossy). Layout 1's is
        exactly what it always was (its keys are pinned); layout 2 adds its inner chunk rows."""
        extra = {"chunk_rows": self.chunk_rows} if self.format_version != LAYOUT_CHUNK else {}
        return {
            **extra,
            "format_version": self.format_version,
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
        if self.key_layout is not None:  # a migrated entry: the key of the layout it was written in
            return replace(self, format_version=self.key_layout, chunk_rows=0, key_layout=None).key
        return entry_key(self.identity())

    def to_json(self) -> dict[str, Any]:
        return {**self.identity(), "dataset": self.dataset, "key": self.key, "stratalign_version": __version__,
                **({"key_layout": self.key_layout} if self.key_layout is not None else {})}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "EntrySpec":
        return cls(dataset=meta["dataset"], content_fingerprint=meta["content_fingerprint"],
                   modality=meta["modality"], encoder=meta["encoder"], pooling=meta["pooling"],
                   layer_names=tuple(meta["layer_names"]), dims=tuple(meta["dims"]), rows=int(meta["rows"]),
                   dtype=meta["dtype"], shard_rows=int(meta["shard_rows"]),
                   format_version=int(meta.get("format_version", LAYOUT_CHUNK)), chunk_rows=int(meta.get("chunk_rows", 0)),
                   key_layout=None if meta.get("key_layout") is None else int(meta["key_layout"]))

    def twins(self) -> list["EntrySpec"]:
        """The same content in the other layouts, newest first (an extraction reuses a complete one)."""
        return [replace(self, format_version=f, chunk_rows=0, key_layout=None) for f in sorted(ENTRY_FORMATS, reverse=True)
                if f != self.format_version]


async def _write_chunks(arrays: list[Any], rows: slice, blocks: list[np.ndarray]) -> None:
    """One shard's chunk of every layer, written concurrently on zarr's event loop (one after the other,
    each write waited for its own round trip: ~2.5 ms a layer on a local disk, more on object stores)."""
    await asyncio.gather(*(a.setitem(rows, b) for a, b in zip(arrays, blocks)))


async def _write_shard_files(arrays: list[Any], shard: int, payloads: list[bytes]) -> None:
    """Layout 2: one shard file per layer (bytes made by store.shard_format), set through zarr's store."""
    proto = default_buffer_prototype()
    await asyncio.gather(*((a.store_path / a.metadata.encode_chunk_key((shard, 0))).set(proto.buffer.from_bytes(p))
                           for a, p in zip(arrays, payloads)))


class FeatureEntry:
    """One entry: per-layer arrays written in whole shards, each shard with a completion marker."""

    def __init__(self, store: "FeatureStore", spec: EntrySpec, group: zarr.Group, key: str | None = None) -> None:
        self.store = store
        self.spec = spec
        self.group = group
        self.key = key or spec.key  # the folder it lives in (entries keyed by an older derivation keep theirs)
        self._markers: dict[int, dict] | None = None
        self._arrays: dict[int, zarr.Array] = {}  # opened once: each open reads and parses zarr.json
        self._sources: dict[int, tuple[ByteSource, ShardGeometry]] = {}  # layout 2 readers, one per layer
        self._seen_complete = False  # every marker was found once: a complete entry stays complete (reads skip the
        # listing of its markers, ~600 files at COCO scale); forget_shards (repair) clears it

    def keep_arrays(self, arrays: dict[int, zarr.Array]) -> None:
        """Adopt layer arrays already open (the ones `FeatureStore.create_entry` just made)."""
        self._arrays.update(arrays)

    # ----- layout helpers
    @property
    def folder(self) -> tuple[str, str]:
        return ("features", self.key)

    def layer_array(self, layer: int) -> zarr.Array:
        """One layer's Zarr array; a corrupt zarr.json is named in a one-line error."""
        if layer in self._arrays:
            return self._arrays[layer]
        name = f"layer_{layer:03d}"
        try:  # the codecs it names, checked before zarr builds anything from them
            check_codecs(self.store.loc.read_bytes(*self.folder, name, "zarr.json"), f"layer {layer} of entry "
                         f"{self.key}", f"remove the entry (stratalign store rm {self.key}) and extract it again")
        except FileNotFoundError:
            pass  # the missing layer is named below
        try:
            self._arrays[layer] = self.group[name]
            return self._arrays[layer]
        except json.JSONDecodeError as exc:
            path = self.store.loc.path(*self.folder, name, "zarr.json")
            raise StratalignError(f"corrupt JSON file {path}: {exc}") from None
        except (KeyError, FileNotFoundError):  # the layer's folder or metadata is gone
            path = self.store.loc.path(*self.folder, name)
            raise StratalignError(f"layer {layer} of entry {self.key} is missing ({path}); re-encode it with "
                                  "`stratalign store repair`") from None

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
        """Every shard's completion marker; a damaged one is a one-line error naming its file and the fix."""
        if self._markers is None or refresh:
            found, damaged = self.read_markers()
            if damaged:
                shard, why = next(iter(damaged.items()))
                raise StratalignError(
                    f"shard marker {self.store.loc.path(*self.folder, '_shards', f'{shard}.json')} is damaged ({why})"
                    f"{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}; re-encode those shards with "
                    "`stratalign store repair`")
            self._markers = found
        return self._markers

    def read_markers(self) -> tuple[dict[int, dict], dict[int, str]]:
        """(whole markers by shard, damaged ones by shard with why): what verify and repair read."""
        loc = self.store.loc
        found: dict[int, dict] = {}
        damaged: dict[int, str] = {}
        for name in loc.listdir(*self.folder, "_shards"):
            if name.endswith(".json") and name[:-5].isdigit():
                shard = int(name[:-5])
                try:
                    marker = loc.read_json(*self.folder, "_shards", name)
                except StratalignError:
                    damaged[shard] = "not JSON"
                    continue
                why = self.marker_problem(shard, marker)
                if why is None:
                    found[shard] = marker
                else:
                    damaged[shard] = why
        return found, damaged

    def marker_problem(self, shard: int, marker: Any) -> str | None:
        """Why a shard marker is not whole (None when it is): a sha256 per layer, its rows, bad rows inside it."""
        if shard >= self.spec.n_shards:
            return None  # beyond the entry: ignored, as before
        if not isinstance(marker, dict):
            return "not an object"
        sha = marker.get("sha256")
        if not isinstance(sha, list) or len(sha) != len(self.spec.dims) or not all(isinstance(h, str) for h in sha):
            return f"no sha256 for each of its {len(self.spec.dims)} layers"
        start, stop = self.shard_rows_range(shard)
        if "rows" in marker and list(marker["rows"]) != [start, stop]:
            return f"rows {marker['rows']} are not {[start, stop]}"
        bad = marker.get("bad_rows") or []
        if not isinstance(bad, list) or any(isinstance(r, bool) or not isinstance(r, int) or not start <= r < stop
                                            for r in bad):
            return f"bad_rows outside the shard's rows {start}..{stop - 1}"
        return None

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

    def forget_shards(self, shards: Sequence[int]) -> None:
        """Remove the completion markers of these shards, so that the next extract encodes them again (repair)."""
        for s in shards:
            self.store.loc.remove(*self.folder, "_shards", f"{s}.json")
        self._markers = None
        self._seen_complete = False

    # ----- writing
    @property
    def claims_folder(self) -> str:
        """The folder of this entry's shard claims (see store.claims)."""
        return "/".join([*self.folder, "_claims"])

    def claim(self, shard: int, claim: claims_mod.Claim, heartbeat: claims_mod.Heartbeat | None = None) -> bool:
        """Claim a pending shard for this worker (False if done or held by a live worker); a won claim is
        kept fresh by `heartbeat` when one is given."""
        if self.shard_done(shard):
            return False
        won = claims_mod.try_claim(self.store.loc, self.claims_folder, shard, claim)
        if won and heartbeat is not None:
            heartbeat.hold(self.store.loc, self.claims_folder, shard)
        return won

    def release(self, shard: int, claim: claims_mod.Claim, heartbeat: claims_mod.Heartbeat | None = None) -> None:
        """Drop our claim on a shard (never anyone else's), through the heartbeat that holds it if any."""
        if heartbeat is not None:
            heartbeat.release(self.store.loc, self.claims_folder, shard)
        else:
            claims_mod.release(self.store.loc, self.claims_folder, shard, claim)

    def claim_state(self, shard: int) -> claims_mod.ClaimState | None:
        """Who holds the shard's claim and whether it is stale (None: no claim)."""
        return claims_mod.read_claim(self.store.loc, self.claims_folder, shard)

    def claim_states(self) -> list[claims_mod.ClaimState]:
        """Every claim on this entry's shards (store ls / verify / unlock)."""
        return claims_mod.describe_claims(self.store.loc, self.claims_folder)

    def has_claim(self, shard: int) -> bool:
        """Does anyone (this worker included) hold a claim on the shard?"""
        return self.store.loc.exists(self.claims_folder, f"{shard}.json")

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
        arrays = [a.async_array for a in self.open_arrays()]
        if spec.format_version == LAYOUT_SHARDED:
            zarr_sync(_write_shard_files(arrays, shard, [encode_shard(b, spec.shard_rows, spec.chunk_rows) for b in blocks]))
        else:
            zarr_sync(_write_chunks(arrays, slice(start, stop), blocks))
        marker = {"shard": shard, "rows": [start, stop], "sha256": [shard_sha(b) for b in blocks],
                  "written_at": time.time(), **(info or {})}
        self.store.loc.write_json(marker, *self.folder, "_shards", f"{shard}.json")
        if self._markers is not None:
            self._markers[shard] = marker

    # ----- reading
    def _source(self, layer: int) -> tuple[ByteSource, ShardGeometry]:
        """Layout 2: the byte source of a layer's shard files and its geometry (opened once per entry)."""
        if layer not in self._sources:
            arr, loc = self.layer_array(layer), self.store.loc
            name = f"layer_{layer:03d}"
            opener = None
            if loc.is_local:  # the layer folder checked once; each shard file opened without following links
                folder = loc.path(*self.folder, name)
                opener = functools.partial(_open_shard, folder, arr.metadata.encode_chunk_key, loc.root)
            src = ByteSource(loc.fs, loc.is_local,
                             lambda s: loc.path(*self.folder, name, arr.metadata.encode_chunk_key((s, 0))), opener)
            geo = ShardGeometry(self.spec.rows, self.spec.dims[layer], self.spec.dtype, self.spec.shard_rows,
                                self.spec.chunk_rows)
            self._sources[layer] = (src, geo)
        return self._sources[layer]

    def _read_sharded(self, idx: int, rows: np.ndarray | None) -> np.ndarray:
        """Layout 2: only the inner chunks holding `rows` (all when None), each checked against its crc32c."""
        src, geo = self._source(idx)
        try:
            return read_rows(src, geo, rows, f"{self.key} layer {idx}")
        except ShardCorrupt as exc:
            raise StratalignError(f"corrupt chunk in {exc}: run `stratalign store verify`") from None
        except FileNotFoundError as exc:
            raise StratalignError(f"a shard file of {self.key} layer {idx} is missing ({exc.filename}): "
                                  "run `stratalign store verify`") from None

    def read_layer(self, layer: int | str, rows: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """One layer's features (all rows, or the given rows in their order). Layout 2 reads only the inner
        chunks holding the rows, each checked against its crc32c; layout 1 reads and decodes the whole layer and
        checks it against the shard markers' sha256 (unless `verify` is False)."""
        idx = self.resolve_layer(layer)
        pending = [] if self._seen_complete else self.pending_shards()
        if pending:
            raise StratalignError(
                f"entry {self.key} is incomplete ({len(pending)} of {self.spec.n_shards} shards missing); "
                f"finish it with: stratalign extract --dataset {self.spec.dataset} --encoder {self.spec.encoder_spec}"
            )
        self._seen_complete = True
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= self.spec.rows):
                raise StratalignError(f"row index out of range for {self.key} ({self.spec.rows} rows)")
        if self.spec.format_version == LAYOUT_SHARDED:
            return self._read_sharded(idx, rows)
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
        return data if rows is None else data[rows]

    def _shard_block(self, layer: int, shard: int) -> np.ndarray:
        """One shard of one layer as stored (for `verify`)."""
        start, stop = self.shard_rows_range(shard)
        if self.spec.format_version == LAYOUT_SHARDED:
            src, geo = self._source(layer)
            return read_rows(src, geo, np.arange(start, stop), f"{self.key} layer {layer}")
        return self.layer_array(layer)[start:stop]

    def verify(self) -> dict[str, list]:
        """Re-read every chunk: {'corrupt': [(shard, layer, why)], 'incomplete': [shard, ...]}; a damaged marker
        is a corrupt shard with layer None."""
        markers, damaged = self.read_markers()
        report: dict[str, list] = {"corrupt": [], "incomplete": []}
        for s in range(self.spec.n_shards):
            if s in damaged:
                report["corrupt"].append((s, None, damaged[s]))
                continue
            if s not in markers:
                report["incomplete"].append(s)
                continue
            for layer in range(len(self.spec.dims)):
                try:
                    block = self._shard_block(layer, s)
                except Exception as exc:  # checksum mismatch, undecodable or missing metadata
                    report["corrupt"].append((s, layer, f"{type(exc).__name__}: {str(exc)[:80]}"))
                    continue
                if shard_sha(block) != markers[s]["sha256"][layer]:
                    report["corrupt"].append((s, layer, "sha256 mismatch"))
        return report


def _open_shard(folder: str, chunk_key: Callable[[tuple[int, int]], str], root: str, shard: int) -> int:
    """A descriptor of a layout-2 shard file below its (checked) layer folder; a symlink on the way is refused in
    one line, as Location.path refuses it."""
    rel = chunk_key((shard, 0))
    try:
        return open_below(folder, rel)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StratalignError(f"{folder}/{rel} is a symlink: refusing to follow it out of the store {root}; "
                                  "replace the link by the file itself") from None
        raise
