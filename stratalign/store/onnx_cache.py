"""ONNX graphs kept in the store so a query runs without torch (use.fast, use.onnx_export).

    onnx/<key>/model.onnx       the graph with its weights inside (protobuf, never pickle)
    onnx/<key>/tokenizer.json   a text tower's tokenizer (the `tokenizers` library's JSON, padding and truncation set)
    onnx/<key>/onnx.json        what the graph is (kind, inputs, how it was checked) and the sha256 of every file
                                above; written last: marks the folder complete

The key (store.keys.onnx_key) hashes what fixes the graph's meaning, so another encoder, layer, pooling or run
never finds a stale graph. A folder whose files do not match their recorded sha256 reads as absent (it is
exported again, and replaced when the store is writable).
"""

from __future__ import annotations

import hashlib
from typing import Any

from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import validate_key

FOLDER = "onnx"
DONE = "onnx.json"


def save(store: FeatureStore, key: str, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    """Write the files (each atomically), then the description with their sha256 (the done mark)."""
    store.require_writable()
    validate_key(key, "onnx cache key")
    sums = {}
    for name, data in files.items():
        validate_key(name, "onnx cache file")
        store.loc.write_bytes(data, FOLDER, key, name)
        sums[name] = hashlib.sha256(data).hexdigest()
    store.loc.write_json({**meta, "files": sums}, FOLDER, key, DONE)


def load(store: FeatureStore, key: str) -> tuple[dict[str, bytes], dict[str, Any]] | None:
    """(files by name, description) of a complete, intact cache folder, or None."""
    validate_key(key, "onnx cache key")
    if not store.loc.exists(FOLDER, key, DONE):
        return None
    try:
        meta = store.loc.read_json(FOLDER, key, DONE)
        sums = meta["files"]
        files = {name: store.loc.read_bytes(FOLDER, key, validate_key(name, "onnx cache file")) for name in sums}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(hashlib.sha256(data).hexdigest() != sums[name] for name, data in files.items()):
        return None
    return files, meta
