"""A feature entry: one (dataset content, encoder, pooling, dtype) group of per-layer arrays in the store.

`EntrySpec` (store.entry_spec, re-exported here) is everything that determines an entry's bytes (its hash is the
entry key, see store.keys); `FeatureEntry` writes and reads the entry in whole shards, each with a completion
marker written last (store.shard_markers: what a marker holds and how a read checks a shard against it), and
holds the claims through which several workers share it (see store.claims).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from stratalign.errors import StratalignError, preview
from stratalign.store import claims as claims_mod
from stratalign.store import shard_markers
from stratalign.store.codecs import check_codecs
from stratalign.store.entry_reads import ShardedReads
from stratalign.store.entry_spec import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_SHARD_ROWS,
    ENTRY_FORMATS,
    FLOAT16_MAX,
    LAYOUT_CHUNK,
    LAYOUT_SHARDED,
    MODALITIES,
    EntrySpec,
    shard_sha,
)
from stratalign.store.shard_format import ByteSource, ShardGeometry, encode_shard, read_rows

if TYPE_CHECKING:
    from stratalign.store.feature_store import FeatureStore

__all__ = ["DEFAULT_CHUNK_ROWS", "DEFAULT_SHARD_ROWS", "ENTRY_FORMATS", "FLOAT16_MAX", "LAYOUT_CHUNK", "LAYOUT_SHARDED",
           "MODALITIES", "EntrySpec", "FeatureEntry", "shard_sha"]


async def _write_chunks(arrays: list[Any], rows: slice, blocks: list[np.ndarray]) -> None:
    """One shard's chunk of every layer, written concurrently on zarr's event loop (one after the other,
    each write waited for its own round trip: ~2.5 ms a layer on a local disk, more on object stores)."""
    await asyncio.gather(*(a.setitem(rows, b) for a, b in zip(arrays, blocks)))


async def _write_shard_files(arrays: list[Any], shard: int, payloads: list[bytes]) -> None:
    """Layout 2: one shard file per layer (bytes made by store.shard_format), set through zarr's store."""
    proto = default_buffer_prototype()
    await asyncio.gather(*((a.store_path / a.metadata.encode_chunk_key((shard, 0))).set(proto.buffer.from_bytes(p))
                           for a, p in zip(arrays, payloads)))


class FeatureEntry(ShardedReads):
    """One entry: per-layer arrays written in whole shards, each shard with a completion marker."""

    def __init__(self, store: "FeatureStore", spec: EntrySpec, group: zarr.Group, key: str | None = None) -> None:
        self.store = store
        self.spec = spec
        self.group = group
        self.key = key or spec.key  # the folder it lives in (entries keyed by an older derivation keep theirs)
        self._markers: dict[int, dict] | None = None
        self._arrays: dict[int, zarr.Array] = {}  # opened once: each open reads and parses zarr.json
        self._sources: dict[int, tuple[ByteSource, ShardGeometry]] = {}  # layout 2 readers, one per layer
        self._crc_tables: dict[int, np.ndarray] = {}  # layout 2: the crc32c the markers name per inner chunk, per layer
        self._sha_checked: dict[int, set[int]] = {}  # shards whose whole block matched its marker's sha256, per layer
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
            arr = self.group[name]
            why = self.layer_problem(layer, arr)
            if why is not None:
                path = self.store.loc.path(*self.folder, name, "zarr.json")
                raise StratalignError(f"{path} does not describe layer {layer} of entry {self.key} ({why}); rewrite "
                                      "it with `stratalign store repair`")
            self._arrays[layer] = arr
            return arr
        except json.JSONDecodeError as exc:
            path = self.store.loc.path(*self.folder, name, "zarr.json")
            raise StratalignError(f"corrupt JSON file {path}: {exc}") from None
        except (KeyError, FileNotFoundError):  # the layer's folder or metadata is gone
            path = self.store.loc.path(*self.folder, name)
            raise StratalignError(f"layer {layer} of entry {self.key} is missing ({path}); re-encode it with "
                                  "`stratalign store repair`") from None

    def layer_problem(self, layer: int, arr: Any) -> str | None:
        """Why a layer's zarr.json does not describe what the entry's spec says (None when it does): its shape,
        dtype, shard rows, and layout 2's inner chunk rows (an edited shape would otherwise pass every read)."""
        spec, dim = self.spec, self.spec.dims[layer]
        if not isinstance(arr, zarr.Array):
            return "not an array"
        sharded = spec.format_version == LAYOUT_SHARDED
        want = {"shape": (spec.rows, dim), "dtype": spec.dtype, "shard": (spec.shard_rows, dim),
                "chunk": (spec.chunk_rows, dim) if sharded else (spec.shard_rows, dim)}
        got = {"shape": tuple(arr.shape), "dtype": str(arr.dtype),
               "shard": tuple(arr.shards or arr.chunks) if sharded else tuple(arr.chunks), "chunk": tuple(arr.chunks)}
        for what in want:
            if got[what] != want[what]:
                return f"{what} {got[what]}, expected {want[what]}"
        return None

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
            self._crc_tables.clear()
            self._sha_checked.clear()
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
        """Why a shard marker is not whole (None when it is): see store.shard_markers."""
        return shard_markers.marker_problem(self.spec, shard, marker)

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
        marker: dict[str, Any] = {"shard": shard, "rows": [start, stop], "sha256": [shard_sha(b) for b in blocks],
                                  "written_at": time.time()}
        if spec.format_version == LAYOUT_SHARDED:
            payloads = [encode_shard(b, spec.shard_rows, spec.chunk_rows) for b in blocks]
            zarr_sync(_write_shard_files(arrays, shard, payloads))
            itemsize = np.dtype(spec.dtype).itemsize
            marker[shard_markers.CHUNK_CRCS] = [shard_markers.chunk_crcs(p, stop - start, spec.chunk_rows,
                                                                         spec.chunk_rows * dim * itemsize + 4)
                                                for p, dim in zip(payloads, spec.dims)]
        else:
            zarr_sync(_write_chunks(arrays, slice(start, stop), blocks))
        marker.update(info or {})
        self.store.loc.write_json(marker, *self.folder, "_shards", f"{shard}.json")
        if self._markers is not None:
            self._markers[shard] = marker

    # ----- reading
    def read_layer(self, layer: int | str, rows: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """One layer's features (all rows, or the given rows in their order). Layout 2 reads only the inner
        chunks holding the rows, each checked against its crc32c; layout 1 reads and decodes the whole layer and
        checks it against the shard markers' sha256. Either way a read returns rows only from the shard file its
        marker names (`verify` False skips that, leaving the per-chunk crc32c: benchmarks compare the two)."""
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
            return self._read_sharded(idx, rows, verify)
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
                except StratalignError as exc:  # a one-line error naming the file and the fix: whole
                    report["corrupt"].append((s, layer, str(exc)))
                    continue
                except Exception as exc:  # checksum mismatch, undecodable or missing metadata
                    report["corrupt"].append((s, layer, f"{type(exc).__name__}: {str(exc)[:200]}"))
                    continue
                if shard_sha(block) != markers[s]["sha256"][layer]:
                    report["corrupt"].append((s, layer, "sha256 mismatch"))
        return report
