"""Zero-shot class prompts ("an emoji of {}.") through the text encoder, cached in the store.

Prompt features are computed once per (text encoder entry, prompts) and kept in the store's prompt cache
(store.prompt_cache), so evaluating a new run never loads an encoder. `extract` fills the cache for datasets
with classes (both engines, see `cache_class_prompts`); a cache miss here loads the encoder once (and checks
it is the same weights).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store import prompt_cache
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import EntrySpec, FeatureEntry, FeatureStore
from stratalign.store.keys import prompt_key


def class_prompts(ds: PairDataset) -> tuple[list[str], list[str], list[str]]:
    """(classes, templates, prompts) with prompts ordered class-major: prompts[c * T + t]."""
    classes, templates = ds.class_names, ds.templates
    if not classes:
        raise StratalignError(f"dataset {ds.name!r} has no labels: zero-shot classification needs a label column")
    return classes, templates, [t.format(c) for c in classes for t in templates]


def prompt_features(entry: FeatureEntry, prompts: list[str], *, device: str = "cpu",
                    load: Callable[[str, str], Any] | None = None) -> list[np.ndarray]:
    """Every layer's pooled features of the prompts (float32), from the cache or one encoder pass."""
    return spec_prompt_features(entry.store, entry.spec, prompts, device=device, load=load)


def spec_prompt_features(store: FeatureStore, spec: EntrySpec, prompts: list[str], *, device: str = "cpu",
                         load: Callable[[str, str], Any] | None = None) -> list[np.ndarray]:
    """`prompt_features` for the entry that `spec` names, whether or not it exists yet."""
    if spec.modality != "text":
        raise StratalignError(f"prompt features need a text encoder entry, not {spec.encoder_spec}")
    key = prompt_key(spec.encoder, spec.pooling, prompts)
    cached = prompt_cache.load(store, key, len(spec.dims))
    if cached is not None:
        return cached
    if load is None:
        from stratalign.encoders import load_encoder as load
    encoder = load(spec.encoder_spec, device)
    import torch  # here, not at the top: stages.extract.skip reads class_prompts without loading torch

    if encoder.metadata().get("weights_sha256") != spec.encoder.get("weights_sha256"):
        raise StratalignError(f"encoder {spec.encoder_spec} now has other weights than when its features "
                              "were extracted; re-extract before evaluating")
    with torch.inference_mode():
        pooled = encoder.forward_pooled(encoder.preprocess(prompts), [spec.pooling])[spec.pooling]
    layers = [t.float().cpu().numpy() for t in pooled]
    if store.mode == "a":
        prompt_cache.save(store, key, layers, prompts)
    return layers


def cache_class_prompts(store: FeatureStore, ds: PairDataset, specs: list[EntrySpec], encoder: Any,
                        device: str) -> int:
    """Fill the prompt cache of a loaded text encoder's entries (`specs`) for a dataset with classes, so
    zero-shot evaluation never loads the encoder; a no-op for image encoders and unlabelled datasets.
    Returns the number of entries whose prompts are cached."""
    if encoder.modality != "text" or not ds.class_names:
        return 0
    prompts = class_prompts(ds)[2]
    for spec in specs:
        spec_prompt_features(store, spec, prompts, device=device, load=lambda *_, e=encoder: e)
    return len(specs)
