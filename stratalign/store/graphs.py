"""Cached kNN graphs of clip+structure-knn (docs/method.md § 3.3: built once per subset), kept in the store.

    graphs/<key>.safetensors   int64 "image" and "text" (n_train, k) graphs over the subset's training rows

The key is the sha256 of everything that determines the graphs: both feature entry keys (themselves
content addresses) and layers, the subset's exact image and caption rows (in training order) and k.
Safetensors only, never pickle. The file's metadata holds the sha256 of both graphs' bytes; a cached file
that cannot be read, does not fit or fails that checksum is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import graph_key
from stratalign.store.location import validate_key

__all__ = ["cached_graphs", "graph_key", "load_graphs", "save_graphs"]

FOLDER = "graphs"
GraphPair = tuple[np.ndarray, np.ndarray]


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (an 8-byte length, then a JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]).get("__metadata__") or {}


def _digest(graphs: GraphPair) -> str:
    h = hashlib.sha256()
    for g in graphs:
        h.update(np.ascontiguousarray(g, dtype="<i8").tobytes())
    return h.hexdigest()


def load_graphs(store: FeatureStore, key: str, n: int) -> GraphPair | None:
    """The cached (image, text) graphs of `key`, or None when absent, unreadable or not n rows long."""
    name = f"{validate_key(key, 'graph key')}.safetensors"
    if not store.loc.exists(FOLDER, name):
        return None
    try:
        blob = store.loc.read_bytes(FOLDER, name)
        tensors = st_load(blob)
        pair = (tensors["image"].numpy(), tensors["text"].numpy())
        stored = _header_metadata(blob).get("sha256")
    except Exception:  # a damaged cache entry is rebuilt, not fatal
        return None
    if any(g.ndim != 2 or g.shape[0] != n or g.dtype != np.int64 for g in pair) or stored != _digest(pair):
        return None
    return pair


def check(blob: bytes) -> str | None:
    """Why a graph file is unusable (None when it reads back and matches its checksum)."""
    try:
        tensors = st_load(blob)
        pair = (tensors["image"].numpy(), tensors["text"].numpy())
        stored = _header_metadata(blob).get("sha256")
    except Exception as exc:
        return f"unreadable ({type(exc).__name__})"
    return None if stored == _digest(pair) else "checksum mismatch"


def save_graphs(store: FeatureStore, key: str, graphs: GraphPair, meta: dict[str, str] | None = None) -> None:
    """Write (image, text) graphs as one safetensors file under graphs/."""
    store.require_writable()
    name = f"{validate_key(key, 'graph key')}.safetensors"
    blob = st_save({"image": torch.from_numpy(np.ascontiguousarray(graphs[0], dtype=np.int64)),
                    "text": torch.from_numpy(np.ascontiguousarray(graphs[1], dtype=np.int64))},
                   metadata={**(meta or {}), "sha256": _digest(graphs)})
    store.loc.write_bytes(blob, FOLDER, name)


def cached_graphs(store: FeatureStore, key: str, n: int, build: Callable[[], GraphPair],
                  meta: dict[str, str] | None = None) -> tuple[GraphPair, bool]:
    """(graphs, came_from_cache): read graphs/<key> or build and write it."""
    hit = load_graphs(store, key, n)
    if hit is not None:
        return hit, True
    graphs = build()
    save_graphs(store, key, graphs, meta)
    return graphs, False
