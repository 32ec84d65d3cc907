"""Zero-shot prompt features kept in the store, so evaluating a run never loads an encoder.

    prompts/<key>.safetensors   float32 "layer_000" ... one (n_prompts, dim) tensor per layer; metadata "prompts"

The key (store.keys.prompt_key) hashes the text encoder's metadata, the pooling and the prompts.
"""

from __future__ import annotations

import json

import numpy as np

from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import validate_key

FOLDER = "prompts"


def _name(key: str) -> str:
    return f"{validate_key(key, 'prompt cache key')}.safetensors"


def exists(store: FeatureStore, key: str) -> bool:
    """Whether prompt features are cached under `key` (imports no torch)."""
    return store.loc.exists(FOLDER, _name(key))


def load(store: FeatureStore, key: str, n_layers: int) -> list[np.ndarray] | None:
    """The cached features of every layer under `key`, or None when nothing (whole) is cached."""
    if not exists(store, key):
        return None
    try:
        layers = check(store.loc.read_bytes(FOLDER, _name(key)))
    except ValueError:
        return None  # a damaged cache is computed again (and overwritten when the store is writable)
    return layers if len(layers) == n_layers else None


def check(blob: bytes) -> list[np.ndarray]:
    """The layers of a prompt cache file; ValueError saying why when it is not one (store verify, load)."""
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
        size = int.from_bytes(blob[:8], "little")
        prompts = json.loads(json.loads(blob[8:8 + size]).get("__metadata__", {}).get("prompts", "null"))
    except Exception as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
    names = [f"layer_{i:03d}" for i in range(len(tensors))]
    if sorted(tensors) != names or not names:
        raise ValueError(f"tensors {sorted(tensors)[:4]} are not layer_000 ...")
    layers = [tensors[n].numpy() for n in names]
    if not isinstance(prompts, list) or any(x.ndim != 2 or x.shape[0] != len(prompts) for x in layers):
        raise ValueError("layers do not hold one row per prompt")
    if any(not np.isfinite(x).all() for x in layers):
        raise ValueError("NaN/inf features")
    return layers


def save(store: FeatureStore, key: str, layers: list[np.ndarray], prompts: list[str]) -> None:
    """Cache every layer's features of the prompts under `key`."""
    import torch
    from safetensors.torch import save as st_save

    store.require_writable()
    blob = st_save({f"layer_{i:03d}": torch.from_numpy(x) for i, x in enumerate(layers)},
                   metadata={"prompts": json.dumps(prompts)})
    store.loc.write_bytes(blob, FOLDER, _name(key))
