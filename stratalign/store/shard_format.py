"""The bytes of one shard file in entry layout 2: Zarr v3's `sharding_indexed` codec, written and read in bulk.

A layer of a layout-2 entry is a Zarr array whose chunk grid is the extraction shard (`shard_rows` rows) and
whose sharding codec cuts each shard into inner chunks of `chunk_rows` rows, each `bytes` (little-endian)
followed by its crc32c, with the index at the end (one `(offset, nbytes)` uint64 pair per inner chunk, then
the index's own crc32c). Any Zarr v3 reader reads these files; tests check zarr reads what `encode_shard`
writes and that `ShardRows` reads what zarr writes.

Why not through zarr's own codec pipeline: zarr 3.1 spends ~0.4 ms per inner chunk (an asyncio task and a
codec pipeline each), so 1,000 random rows took 0.4 s and a 100k-row layer 3.2 s (it was 0.3 s in one chunk
per shard). Here the index and the chunks asked for are fetched by byte range (pread on a local disk, one
concurrent `cat_ranges` on object stores), adjacent chunks in one request, and each chunk's crc32c checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import google_crc32c
import numpy as np

EMPTY = np.uint64(2**64 - 1)  # offset and nbytes of an inner chunk that was never written (all fill value)
INDEX_ENTRY = 16  # bytes per inner chunk in the index: offset + nbytes, uint64 little-endian


class ShardCorrupt(ValueError):
    """A shard file whose index or chunk fails its crc32c, or that lacks a chunk it should hold."""


def sharding_codec(chunk_rows: int, dim: int) -> dict[str, Any]:
    """The `sharding_indexed` codec document of a layout-2 layer (what zarr writes for these settings)."""
    bytes_crc = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {"name": "sharding_indexed", "configuration": {"chunk_shape": [chunk_rows, dim], "codecs": bytes_crc,
                                                          "index_codecs": bytes_crc, "index_location": "end"}}


def _crc(data: Any) -> bytes:
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def index_nbytes(n_chunks: int) -> int:
    return n_chunks * INDEX_ENTRY + 4


def encode_shard(block: np.ndarray, shard_rows: int, chunk_rows: int) -> bytes:
    """One shard file: `block` (rows <= shard_rows, dim) cut into inner chunks of `chunk_rows` rows (the last one
    padded with NaN, zarr's fill value; chunks wholly past the rows are left out, as zarr leaves empty chunks)."""
    n_rows, dim = block.shape
    n_chunks = shard_rows // chunk_rows
    present = -(-n_rows // chunk_rows)
    full = np.full((present * chunk_rows, dim), np.nan, dtype=block.dtype.newbyteorder("<"))
    full[:n_rows] = block
    chunks = full.reshape(present, chunk_rows * dim)
    nbytes = chunks.shape[1] * chunks.itemsize + 4
    index = np.full((n_chunks, 2), EMPTY, dtype="<u8")
    index[:present, 0] = np.arange(present, dtype=np.uint64) * nbytes
    index[:present, 1] = nbytes
    parts = []
    for row in chunks:
        payload = row.tobytes()
        parts += [payload, _crc(payload)]
    index_bytes = index.tobytes()
    return b"".join([*parts, index_bytes, _crc(index_bytes)])


def parse_index(raw: bytes, n_chunks: int, where: str) -> np.ndarray:
    """The (n_chunks, 2) offsets and sizes of a shard's index bytes, after checking its crc32c."""
    if len(raw) != index_nbytes(n_chunks) or _crc(raw[:-4]) != raw[-4:]:
        raise ShardCorrupt(f"{where}: shard index fails its crc32c")
    return np.frombuffer(raw, dtype="<u8", count=n_chunks * 2).reshape(n_chunks, 2)


@dataclass(frozen=True)
class ShardGeometry:
    """What a reader needs to know about one layer: rows, width, dtype, shard and inner chunk sizes."""

    rows: int
    dim: int
    dtype: str
    shard_rows: int
    chunk_rows: int

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_rows * self.dim * np.dtype(self.dtype).itemsize + 4


class ByteSource:
    """Byte ranges of the shard files of one layer, read straight into the caller's buffers: `preadv` on a local
    disk (each file opened once per read), one concurrent `cat_ranges` per batch elsewhere. `path(s)` names
    shard s's file; `sizes` gives file sizes (the index sits at the end)."""

    def __init__(self, fs: Any, local: bool, path: Callable[[int], str],
                 open_fd: Callable[[int], int] | None = None) -> None:
        self.fs, self.local, self.path = fs, local, path
        self.open_fd = open_fd or (lambda s: os.open(self.path(s), os.O_RDONLY))
        self._sizes: dict[int, int] = {}
        self._fds: dict[int, int] = {}

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = self.open_fd(shard)
        return self._fds[shard]

    def close(self) -> None:
        """Close the files a read opened (local disks)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def sizes(self, shards: list[int]) -> list[int]:
        missing = [s for s in shards if s not in self._sizes]
        if missing and self.local:
            for s in missing:
                self._sizes[s] = os.fstat(self._fd(s)).st_size
        elif missing:  # one listing per layer on object stores, not one HEAD per shard
            folder = self.path(missing[0]).rsplit("/", 2)[0]
            self.fs.invalidate_cache(folder)  # a listing cached before the last shards were written would miss them
            found = self.fs.find(folder, detail=True)
            self._sizes.update({_shard_of(name): int(info["size"]) for name, info in found.items()
                                if _shard_of(name) is not None})
        try:
            return [self._sizes[s] for s in shards]
        except KeyError as exc:
            raise FileNotFoundError(2, "no such shard file", self.path(int(exc.args[0]))) from None

    def read_into(self, shards: list[int], starts: list[int], outs: list[np.ndarray]) -> None:
        """Fill each contiguous uint8 buffer in `outs` with the bytes of its shard file from its start."""
        if not self.local:
            blobs = self.fs.cat_ranges([self.path(s) for s in shards], starts, [a + o.size for a, o in zip(starts, outs)])
            for blob, out in zip(blobs, outs):
                if isinstance(blob, BaseException):  # cat_ranges hands back a failed range's exception
                    raise blob
                if len(blob) != out.size:
                    raise ShardCorrupt(f"short read of {len(blob)} bytes, expected {out.size}")
                out[:] = np.frombuffer(blob, dtype=np.uint8)
            return
        for s, a, out in zip(shards, starts, outs):
            try:
                got = os.preadv(self._fd(s), [out], a)
            except OSError as exc:
                if exc.filename is None:
                    raise OSError(exc.errno, exc.strerror, self.path(s)) from None
                raise
            if got != out.size:
                raise ShardCorrupt(f"short read of {got} bytes from {self.path(s)}, expected {out.size}")


def _shard_of(name: str) -> int | None:
    """Shard number of a chunk file path `.../c/<s>/0` (None for anything else)."""
    parts = name.rstrip("/").split("/")
    return int(parts[-2]) if len(parts) >= 3 and parts[-3] == "c" and parts[-2].isdigit() and parts[-1] == "0" else None


def _crc_ok(blocks: np.ndarray) -> np.ndarray:
    """Per row of a (n, payload + 4) uint8 array: does the payload's crc32c match the last 4 bytes?"""
    stored = np.ascontiguousarray(blocks[:, -4:]).view("<u4").ravel()
    computed = np.fromiter((google_crc32c.value(b) for b in blocks[:, :-4]), dtype=np.uint32, count=len(blocks))
    return stored == computed


def _indexes(src: ByteSource, geo: ShardGeometry, shards: list[int], where: str) -> np.ndarray:
    """The (len(shards), chunks_per_shard, 2) offsets and sizes of the shards' inner chunks, crc32c-checked."""
    n_idx = index_nbytes(geo.chunks_per_shard)
    raw = np.empty((len(shards), n_idx), dtype=np.uint8)
    sizes = src.sizes(shards)
    for s, size in zip(shards, sizes):
        if size < n_idx:  # a truncated or zero-byte file: named (pread at a negative offset said "Invalid argument")
            raise ShardCorrupt(f"{where} shard {s}: {src.path(s)} holds {size} bytes, less than its index")
    src.read_into(shards, [size - n_idx for size in sizes], list(raw))
    ok = _crc_ok(raw)
    if not ok.all():
        raise ShardCorrupt(f"{where} shard {shards[int(np.argmin(ok))]}: shard index fails its crc32c")
    return raw[:, :-4].view("<u8").reshape(len(shards), geo.chunks_per_shard, 2)


def read_rows(src: ByteSource, geo: ShardGeometry, rows: np.ndarray | None, where: str,
              expect: np.ndarray | None = None) -> np.ndarray:
    """Rows (any order, repeats allowed; None: all) of one layer, reading only the index and the inner chunks
    that hold them, every chunk read checked against its crc32c and, with `expect` ((shards, chunks per shard)
    crc32c as uint64, values above 2**32-1 unknown), that crc32c against the one expected at its place: the chunk
    is the one named there, not a whole chunk from another shard file. Raises ShardCorrupt on damage."""
    uniq, inverse = (np.arange(geo.rows), None) if rows is None else np.unique(rows, return_inverse=True)
    if uniq.size == 0:
        return np.empty((0, geo.dim), dtype=geo.dtype)
    chunk_ids, first = np.unique(uniq // geo.chunk_rows, return_index=True)
    shard_of = chunk_ids // geo.chunks_per_shard
    shards, pos = np.unique(shard_of, return_inverse=True)
    try:
        offsets = _indexes(src, geo, shards.tolist(), where)[pos, chunk_ids % geo.chunks_per_shard]
        bad = (offsets[:, 0] == EMPTY) | (offsets[:, 1] != geo.chunk_nbytes)
        if bad.any():
            c = int(chunk_ids[np.argmax(bad)])
            raise ShardCorrupt(f"{where} shard {c // geo.chunks_per_shard}: inner chunk {c % geo.chunks_per_shard} "
                               "is missing or has the wrong size")
        starts = offsets[:, 0].astype(np.int64)
        # one read per run of chunks adjacent in the same file, straight into its rows of `chunks`
        breaks = np.flatnonzero((np.diff(shard_of) != 0) | (np.diff(starts) != geo.chunk_nbytes)) + 1
        run_first, run_end = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(chunk_ids)]])
        chunks = np.empty((len(chunk_ids), geo.chunk_nbytes), dtype=np.uint8)
        src.read_into(shard_of[run_first].tolist(), starts[run_first].tolist(),
                      [chunks[a:b].reshape(-1) for a, b in zip(run_first.tolist(), run_end.tolist())])
    finally:
        src.close()
    ok = _crc_ok(chunks)
    if not ok.all():
        c = int(chunk_ids[np.argmin(ok)])
        raise ShardCorrupt(f"{where} shard {c // geo.chunks_per_shard}: inner chunk {c % geo.chunks_per_shard} "
                           "fails its crc32c")
    if expect is not None:
        want = expect[shard_of, chunk_ids % geo.chunks_per_shard]
        stored = np.ascontiguousarray(chunks[:, -4:]).view("<u4").ravel()
        wrong = (want <= 0xFFFFFFFF) & (want != stored)
        if wrong.any():
            c = int(chunk_ids[np.argmax(wrong)])
            raise ShardCorrupt(f"{where} shard {c // geo.chunks_per_shard}: inner chunk {c % geo.chunks_per_shard} is "
                               "not the one its shard marker names (a shard file copied or moved from elsewhere?)")
    values = chunks[:, :-4].view(np.dtype(geo.dtype).newbyteorder("<")).reshape(len(chunk_ids), geo.chunk_rows, geo.dim)
    if rows is None:  # one copy, into an array padded to whole chunks
        out = np.empty((len(chunk_ids) * geo.chunk_rows, geo.dim), dtype=geo.dtype)
        out.reshape(values.shape)[...] = values
        return out[: geo.rows]
    slot = np.repeat(np.arange(len(chunk_ids)), np.diff(np.append(first, len(uniq))))
    picked = values[slot, uniq - chunk_ids[slot] * geo.chunk_rows]
    if len(rows) == len(uniq) and np.array_equal(rows, uniq):  # sorted distinct rows (a run's table): no 2nd copy
        return picked.astype(geo.dtype, copy=False)
    return picked[inverse].astype(geo.dtype, copy=False)


def open_below(folder: str, relpath: str) -> int:
    """A read-only descriptor of `folder/relpath`, opened one component at a time without following a symlink
    (O_NOFOLLOW at each step): what Location.path's realpath check guarantees, at a few system calls a file
    instead of one lstat per path component (a 5,000-row read opens ~600 shard files). `folder` itself must
    have been checked. A symlink on the way -> OSError (ELOOP or ENOTDIR)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *dirs, name = relpath.split("/")
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
