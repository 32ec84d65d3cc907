"""Search indexes of a dataset in a run's embedding space (FAISS), kept in the store and reused.

    indexes/<key>/index.faiss   faiss.serialize_index bytes (an exact inner-product index over unit vectors)
    indexes/<key>/index.json    what the index holds: run id, dataset + fingerprint, modality, split, the dataset
                                rows of its vectors (in index order), how they were embedded; written last

The key (store.keys.index_key) hashes the run id, the dataset fingerprint, the modality and the split, so a
retrained run or a changed dataset never finds a stale index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import index_key
from stratalign.store.location import validate_key

__all__ = ["index_key", "load_index", "save_index"]


def save_index(store: FeatureStore, key: str, index_bytes: bytes, meta: dict[str, Any]) -> None:
    """Write the index bytes, then its description (the done mark)."""
    store.require_writable()
    validate_key(key, "index key")
    store.loc.write_bytes(index_bytes, "indexes", key, "index.faiss")
    store.loc.write_json(meta, "indexes", key, "index.json")


def load_index(store: FeatureStore, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(index bytes as uint8, description) of a finished index, or None when there is none."""
    validate_key(key, "index key")
    if not store.loc.exists("indexes", key, "index.json"):
        return None
    meta = store.loc.read_json("indexes", key, "index.json")
    try:
        data = store.loc.read_bytes("indexes", key, "index.faiss")
    except OSError as exc:
        raise StratalignError(f"index {key} in {store.url} is unreadable ({type(exc).__name__}); delete "
                              f"{store.loc.path('indexes', key)} to rebuild it") from None
    return np.frombuffer(data, dtype=np.uint8), meta
