"""Layout-2 reads of a feature entry (a mixin of `FeatureEntry`): each layer's shard files read by byte range,
every chunk checked against its own crc32c and against the crc32c its shard's marker names (store.shard_markers),
so that a read returns rows only from the shard file its marker names."""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store import shard_markers
from stratalign.store.entry_spec import shard_sha
from stratalign.store.shard_format import ByteSource, ShardCorrupt, ShardGeometry, open_below, read_rows

if TYPE_CHECKING:
    from stratalign.store.entry_spec import EntrySpec
    from stratalign.store.feature_store import FeatureStore


class ShardedReads:
    """What FeatureEntry's layout-2 reads need of it, and the reads themselves."""

    store: "FeatureStore"
    spec: "EntrySpec"
    key: str
    _sources: dict[int, tuple[ByteSource, ShardGeometry]]
    _crc_tables: dict[int, np.ndarray]
    _sha_checked: dict[int, set[int]]

    folder: Any
    layer_array: Callable[[int], Any]
    markers: Callable[..., dict[int, dict]]
    shard_rows_range: Callable[[int], tuple[int, int]]

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

    def _read_sharded(self, idx: int, rows: np.ndarray | None, verify: bool = True) -> np.ndarray:
        """Layout 2: only the inner chunks holding `rows` (all when None), each checked against its crc32c and
        (`verify`) against the crc32c its shard's marker names (see store.shard_markers)."""
        src, geo = self._source(idx)
        where = f"{self.key} layer {idx}"
        try:
            expect = None
            if verify:
                expect = self._crc_table(idx)
                self._check_unnamed_shards(idx, expect, rows)
            return read_rows(src, geo, rows, where, expect)
        except ShardCorrupt as exc:
            raise StratalignError(f"corrupt chunk in {exc}: run `stratalign store verify`") from None
        except FileNotFoundError as exc:
            raise StratalignError(f"a shard file of {self.key} layer {idx} is missing ({exc.filename}): "
                                  "run `stratalign store verify`") from None
        except OSError as exc:  # a shard file that cannot be read: named, never a bare "Invalid argument"
            raise StratalignError(f"cannot read a shard file of {where} ({exc.filename or self.store.loc.path(*self.folder)}"
                                  f": {exc.strerror or exc}): run `stratalign store verify`") from None

    def _crc_table(self, layer: int) -> np.ndarray:
        if layer not in self._crc_tables:
            self._crc_tables[layer] = shard_markers.crc_table(self.spec, self.markers(), layer)
        return self._crc_tables[layer]

    def _check_unnamed_shards(self, layer: int, table: np.ndarray, rows: np.ndarray | None) -> None:
        """Shards whose markers name no chunk crc32c (written before they did): the whole block of each shard the
        rows touch is checked against the marker's sha256 once (a read then costs whole shards, as layout 1)."""
        unnamed = table[:, 0] == shard_markers.UNKNOWN
        if not unnamed.any():
            return
        touched = np.arange(self.spec.n_shards) if rows is None else np.unique(rows // self.spec.shard_rows)
        done = self._sha_checked.setdefault(layer, set())
        src, geo = self._source(layer)
        for s in touched[unnamed[touched]].tolist():
            if s in done:
                continue
            start, stop = self.shard_rows_range(s)
            block = read_rows(src, geo, np.arange(start, stop), f"{self.key} layer {layer}")
            if shard_sha(block) != self.markers()[s]["sha256"][layer]:
                raise ShardCorrupt(f"{self.key} layer {layer} shard {s}: its values do not match its marker's sha256 "
                                   "(a shard file copied or moved from elsewhere?)")
            done.add(s)


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
