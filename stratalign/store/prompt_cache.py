"""Zero-shot prompt features kept in the store, so evaluating a run never loads an encoder.

    prompts/<key>.safetensors   float32 "layer_000" ... one (n_prompts, dim) tensor per layer; metadata "prompts"

The key (store.keys.prompt_key) hashes the text encoder's metadata, the pooling and the prompts.
"""

from __future__ import annotations

import json

import numpy as np

from stratalign.store.features import FeatureStore
from stratalign.store.location import validate_key

FOLDER = "prompts"


def _name(key: str) -> str:
    return f"{validate_key(key, 'prompt cache key')}.safetensors"


def exists(store: FeatureStore, key: str) -> bool:
    """Whether prompt features are cached under `key` (imports no torch)."""
    return store.loc.exists(FOLDER, _name(key))


def load(store: FeatureStore, key: str, n_layers: int) -> list[np.ndarray] | None:
    """The cached features of every layer under `key`, or None when nothing is cached."""
    from safetensors.torch import load as st_load

    if not exists(store, key):
        return None
    tensors = st_load(store.loc.read_bytes(FOLDER, _name(key)))
    return [tensors[f"layer_{i:03d}"].numpy() for i in range(n_layers)]


def save(store: FeatureStore, key: str, layers: list[np.ndarray], prompts: list[str]) -> None:
    """Cache every layer's features of the prompts under `key`."""
    import torch
    from safetensors.torch import save as st_save

    store.require_writable()
    blob = st_save({f"layer_{i:03d}": torch.from_numpy(x) for i, x in enumerate(layers)},
                   metadata={"prompts": json.dumps(prompts)})
    store.loc.write_bytes(blob, FOLDER, _name(key))
