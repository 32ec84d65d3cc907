"""Cached kNN graphs of clip+structure-knn (METHOD 3.3: built once per subset), kept in the store.

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

from stratalign.store.features import FeatureStore
from stratalign.store.location import validate_key

FOLDER = "graphs"
GraphPair = tuple[np.ndarray, np.ndarray]


def graph_key(vision_entry: str, vision_layer: int, text_entry: str, text_layer: int, image_rows: np.ndarray,
              caption_rows: np.ndarray, k: int) -> str:
    """sha256 hex of (entries, layers, training rows, k): the file name stem of the cached graphs."""
    h = hashlib.sha256()
    h.update(json.dumps([vision_entry, int(vision_layer), text_entry, int(text_layer), int(k)]).encode())
    for rows in (image_rows, caption_rows):
        arr = np.ascontiguousarray(np.asarray(rows, dtype="<i8"))
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return validate_key(h.hexdigest(), "graph key")


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


def save_graphs(store: FeatureStore, key: str, graphs: GraphPair, meta: dict[str, str] | None = None) -> None:
    """Write (image, text) graphs as one safetensors file under graphs/."""
    store._writable()
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
