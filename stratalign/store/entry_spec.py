"""What an entry is: `EntrySpec` (everything that determines an entry's bytes; its hash is the entry key, see
store.keys), the entry layouts and `shard_sha` (the checksum a shard marker records per layer)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.keys import entry_key
from stratalign.version import __version__

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
ENTRY_PRECISIONS = ("fp32", "bf16")


def check_feature_precision(precision: str | None) -> None:
    """A features' precision a reader names (None: fp32 first) is one of ENTRY_PRECISIONS; a one-line error else."""
    if precision is not None and precision not in ENTRY_PRECISIONS:
        raise StratalignError(f"unknown feature precision {precision!r}: use {' or '.join(ENTRY_PRECISIONS)} "
                              "(--feature-precision)")


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
    # the encoder's forward precision (docs/method.md § 1): fp32 | bf16; part of the key only when not fp32 (older keys stay)
    precision: str = "fp32"

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
        if self.precision not in ENTRY_PRECISIONS:
            raise StratalignError(f"unknown forward precision {self.precision!r}: use one of {ENTRY_PRECISIONS}")
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
        exactly what it always was (its keys are pinned); layout 2 adds its inner chunk rows; a forward in another
        precision than fp32 adds it (other content, docs/method.md § 1)."""
        extra = {"chunk_rows": self.chunk_rows} if self.format_version != LAYOUT_CHUNK else {}
        if self.precision != "fp32":
            extra["precision"] = self.precision
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
                   key_layout=None if meta.get("key_layout") is None else int(meta["key_layout"]),
                   precision=str(meta.get("precision", "fp32")))

    def twins(self) -> list["EntrySpec"]:
        """The same content in the other layouts, newest first (an extraction reuses a complete one)."""
        return [replace(self, format_version=f, chunk_rows=0, key_layout=None) for f in sorted(ENTRY_FORMATS, reverse=True)
                if f != self.format_version]
