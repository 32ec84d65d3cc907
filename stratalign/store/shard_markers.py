"""What a shard's completion marker promises, and how a read holds a shard file to it.

A marker (`features/<key>/_shards/<s>.json`, written after the shard's files) records the sha256 of each layer's
block. A layout-2 marker also records `chunk_crc32c`: per layer, the crc32c of every inner chunk of the shard file
(base64 of little-endian uint32s, in chunk order). A byte-range read already checks each chunk it reads against
the crc32c stored beside it, which catches damage but not a whole shard file copied over another (each chunk is
whole, just from elsewhere: issue 29's "shard swap"). Comparing those stored crc32c with the marker's says the
chunk is the one the marker names, identity and content, with no extra bytes read. Markers written before they
carried `chunk_crc32c` (and layout 1, which always reads whole shards) are checked by the sha256 of the whole
shard block instead, once per shard and process.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stratalign.store.entry_spec import EntrySpec

CHUNK_CRCS = "chunk_crc32c"
UNKNOWN = np.uint64(2**32)  # no crc32c recorded for this chunk: its shard is checked by its sha256 instead


def chunk_crcs(payload: bytes, n_rows: int, chunk_rows: int, chunk_nbytes: int) -> str:
    """The `chunk_crc32c` field of one layer: the crc32c each present inner chunk of `payload` (a shard file made
    by shard_format.encode_shard) carries in its last 4 bytes."""
    present = -(-n_rows // chunk_rows)
    chunks = np.frombuffer(payload, dtype=np.uint8, count=present * chunk_nbytes).reshape(present, chunk_nbytes)
    return base64.b64encode(np.ascontiguousarray(chunks[:, -4:]).tobytes()).decode()


def crc_table(spec: "EntrySpec", markers: dict[int, dict], layer: int) -> np.ndarray:
    """(n_shards, chunks per shard) uint64 of the crc32c the markers name for each inner chunk of a layer; UNKNOWN
    where a marker records none (older markers) or the chunk lies past the rows."""
    per_shard = spec.shard_rows // spec.chunk_rows
    table = np.full((spec.n_shards, per_shard), UNKNOWN, dtype=np.uint64)
    for s, marker in markers.items():
        crcs = marker.get(CHUNK_CRCS) if 0 <= s < spec.n_shards else None
        if not isinstance(crcs, list) or len(crcs) != len(spec.dims) or not isinstance(crcs[layer], str):
            continue
        try:
            got = np.frombuffer(base64.b64decode(crcs[layer], validate=True), dtype="<u4")
        except ValueError:
            continue  # marker_problem names it
        table[s, :min(len(got), per_shard)] = got[:per_shard]
    return table


def crc_problem(spec: "EntrySpec", shard: int, crcs: Any) -> str | None:
    """Why a marker's `chunk_crc32c` is malformed (None when absent or whole)."""
    if crcs is None:
        return None
    start = shard * spec.shard_rows
    present = -(-(min(start + spec.shard_rows, spec.rows) - start) // spec.chunk_rows) if spec.chunk_rows else 0
    if not isinstance(crcs, list) or len(crcs) != len(spec.dims):
        return f"{CHUNK_CRCS} is not one entry per layer"
    for layer, text in enumerate(crcs):
        try:
            raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 4 * present:
            return f"{CHUNK_CRCS} of layer {layer} does not hold {present} crc32c"
    return None


def marker_problem(spec: "EntrySpec", shard: int, marker: Any) -> str | None:
    """Why a shard marker is not whole (None when it is): a sha256 per layer, its rows, bad rows inside it, and
    (layout 2) a crc32c per inner chunk when it records them."""
    if shard >= spec.n_shards:
        return None  # beyond the entry: ignored, as before
    if not isinstance(marker, dict):
        return "not an object"
    sha = marker.get("sha256")
    if not isinstance(sha, list) or len(sha) != len(spec.dims) or not all(isinstance(h, str) for h in sha):
        return f"no sha256 for each of its {len(spec.dims)} layers"
    start = shard * spec.shard_rows
    stop = min(start + spec.shard_rows, spec.rows)
    if "rows" in marker and list(marker["rows"]) != [start, stop]:
        return f"rows {marker['rows']} are not {[start, stop]}"
    bad = marker.get("bad_rows") or []
    if not isinstance(bad, list) or any(isinstance(r, bool) or not isinstance(r, int) or not start <= r < stop
                                        for r in bad):
        return f"bad_rows outside the shard's rows {start}..{stop - 1}"
    return crc_problem(spec, shard, marker.get(CHUNK_CRCS))
