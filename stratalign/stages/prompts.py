"""Zero-shot class prompts ("an emoji of {}.") through the text encoder, cached in the store.

Prompt features are computed once per (text encoder entry, prompts) and kept as safetensors under
`prompts/`, so evaluating a new run never loads an encoder. `extract` fills the cache for datasets
with classes; a cache miss here loads the encoder once (and checks it is the same weights).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from stratalign.errors import StratalignError
from stratalign.store.datasets import PairDataset
from stratalign.store.features import FeatureEntry


def class_prompts(ds: PairDataset) -> tuple[list[str], list[str], list[str]]:
    """(classes, templates, prompts) with prompts ordered class-major: prompts[c * T + t]."""
    classes, templates = ds.class_names, ds.templates
    if not classes:
        raise StratalignError(f"dataset {ds.name!r} has no labels: zero-shot classification needs a label column")
    return classes, templates, [t.format(c) for c in classes for t in templates]


def _cache_key(entry: FeatureEntry, prompts: list[str]) -> str:
    ident = {"encoder": entry.spec.encoder, "pooling": entry.spec.pooling, "prompts": prompts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def prompt_features(entry: FeatureEntry, prompts: list[str], *, device: str = "cpu",
                    load: Callable[[str, str], Any] | None = None) -> list[np.ndarray]:
    """Every layer's pooled features of the prompts (float32), from the cache or one encoder pass."""
    if entry.spec.modality != "text":
        raise StratalignError(f"prompt features need a text encoder entry, not {entry.spec.encoder_spec}")
    loc = entry.store.loc
    name = f"{_cache_key(entry, prompts)}.safetensors"
    if loc.exists("prompts", name):
        tensors = st_load(loc.read_bytes("prompts", name))
        return [tensors[f"layer_{i:03d}"].numpy() for i in range(len(entry.spec.dims))]
    if load is None:
        from stratalign.encoders import load_encoder as load
    encoder = load(entry.spec.encoder_spec, device)
    if encoder.metadata().get("weights_sha256") != entry.spec.encoder.get("weights_sha256"):
        raise StratalignError(f"encoder {entry.spec.encoder_spec} now has other weights than when its features "
                              "were extracted; re-extract before evaluating")
    with torch.inference_mode():
        pooled = encoder.forward_pooled(encoder.preprocess(prompts), [entry.spec.pooling])[entry.spec.pooling]
    layers = [t.float().cpu().numpy() for t in pooled]
    if entry.store.mode == "a":
        loc.write_bytes(st_save({f"layer_{i:03d}": torch.from_numpy(x) for i, x in enumerate(layers)},
                                metadata={"prompts": json.dumps(prompts)}), "prompts", name)
    return layers
