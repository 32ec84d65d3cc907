"""A run's data in the store, shared by training and evaluation: cached features of its pairs, what its
validation yardsticks need (image ids, labels, class prompts), and the training rows saved beside its weights."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from stratalign.stages.prompts import class_prompts, prompt_features
from stratalign.stages.runs.config import ResolvedRun, RunInputs
from stratalign.stages.subsets import PairRows, drop_bad_pairs, unpaired_rows, validation_pairs
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import FeatureEntry
from stratalign.train.validation import ValidationTargets

SUBSET_KEYS = ("subset_image_rows", "subset_caption_rows")


_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (store, entry, layer, rows digest) -> features as stored


def _cache_bytes() -> int:
    """The gather cache's budget: STRATALIGN_GATHER_CACHE_MB (default 512; 0 turns it off)."""
    return int(float(os.environ.get("STRATALIGN_GATHER_CACHE_MB", "512")) * 2**20)


def gather(entry: FeatureEntry, layer: int, rows: np.ndarray) -> np.ndarray:
    """One layer's features of the given rows as float32 (a fresh array). The rows as stored are kept in a small
    LRU cache, so the runs of a sweep that share an (entry, layer, rows) read them once (entries are immutable
    once complete: a key names its bytes)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    key = (entry.store.url, entry.key, int(layer), hashlib.sha256(rows.tobytes()).hexdigest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].astype(np.float32)
    data = entry.read_layer(layer, rows)
    budget = _cache_bytes()
    if data.nbytes <= budget // 2:
        _CACHE[key] = data
        while sum(a.nbytes for a in _CACHE.values()) > budget:
            _CACHE.popitem(last=False)
    return data.astype(np.float32)


def subset_tensors(subset: PairRows) -> dict[str, Any]:
    """The exact training rows, saved with the weights (reproducibility, CoMM probes on reload)."""
    return {SUBSET_KEYS[0]: torch.from_numpy(subset.image_rows.astype(np.int64)),
            SUBSET_KEYS[1]: torch.from_numpy(subset.caption_rows.astype(np.int64))}


def split_run_tensors(tensors: dict[str, Any]) -> tuple[dict[str, Any], PairRows]:
    """(model tensors, training rows) of a saved run."""
    model = {k: v for k, v in tensors.items() if k not in SUBSET_KEYS}
    return model, PairRows(tensors[SUBSET_KEYS[0]].numpy(), tensors[SUBSET_KEYS[1]].numpy())


def train_features_of(inputs: RunInputs, vision_layer: int, text_layer: int,
                      subset: PairRows) -> tuple[np.ndarray, ...]:
    """(image features, text features, labels) of a run's training pairs, read from its entries."""
    labels = inputs.dataset.images["label"].to_numpy()[subset.image_rows]
    return (gather(inputs.vision, vision_layer, subset.image_rows), gather(inputs.text, text_layer, subset.caption_rows),
            labels)


def validation_targets(ds: PairDataset, val: PairRows, text_entry: FeatureEntry, text_layer: int) -> ValidationTargets:
    """The validation pairs' image rows (one gallery image each), and for a labelled dataset their class
    indices and the class prompts' features at the text layer (zero-shot on validation, docs/method.md § 3.8)."""
    labels = ds.images["label"].to_list() if "label" in ds.images.columns else []
    val_labels = [labels[i] for i in val.image_rows] if labels else []
    if not ds.class_names or not val_labels or any(x is None for x in val_labels):
        return ValidationTargets(val.image_rows.copy())
    classes, templates, prompts = class_prompts(ds)
    feats = prompt_features(text_entry, prompts)[text_layer].astype(np.float32)
    class_of = {c: i for i, c in enumerate(classes)}
    return ValidationTargets(val.image_rows.copy(), np.array([class_of[x] for x in val_labels], dtype=np.int64),
                             feats.reshape(len(classes), len(templates), -1))


def run_unpaired(run: ResolvedRun, inputs: RunInputs, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The (image rows, caption rows) a run adds to its R_S batches (docs/method.md § 3.11), from its train pool."""
    assert run.subset is not None
    pool, _ = validation_pairs(inputs.dataset, run.validation, run.val_fraction, run.seed)
    pool, _ = drop_bad_pairs(pool, inputs.vision, inputs.text)
    return unpaired_rows(inputs.dataset, pool, run.subset, source, inputs.vision, inputs.text)


def unpaired_features(prepared: list[Any], vision_layer: int, text_layer: int
                      ) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[tuple[np.ndarray, np.ndarray] | None]]:
    """((image features, caption features) of the unpaired rows the runs name, read once; each run's positions in
    them, None for a run without unpaired rows). `prepared` items carry .unpaired (store rows) and .inputs."""
    named = [p for p in prepared if p.unpaired is not None]
    if not named:
        return None, [None] * len(prepared)
    rows = [np.unique(np.concatenate([p.unpaired[m] for p in named])) for m in (0, 1)]
    first = named[0].inputs
    tables = (gather(first.vision, vision_layer, rows[0]), gather(first.text, text_layer, rows[1]))
    pools = [None if p.unpaired is None else (np.searchsorted(rows[0], p.unpaired[0]),
                                              np.searchsorted(rows[1], p.unpaired[1])) for p in prepared]
    return tables, pools
