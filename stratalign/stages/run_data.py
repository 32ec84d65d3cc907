"""A run's data in the store, shared by training and evaluation: cached features of its pairs and the
training rows saved beside its weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stratalign.errors import StratalignError
from stratalign.stages.run_config import ResolvedRun
from stratalign.stages.subsets import PairRows
from stratalign.store.features import FeatureEntry, FeatureStore

SUBSET_KEYS = ("subset_image_rows", "subset_caption_rows")


def gather(entry: FeatureEntry, layer: int, rows: np.ndarray, cache: LayerCache | None = None) -> np.ndarray:
    """One layer's features of the given rows as float32 (through `cache` when given)."""
    if cache is not None:
        return cache.rows(entry, layer, rows)
    return entry.read_layer(layer, rows).astype(np.float32)


class LayerCache:
    """Whole layers read (and checksum-verified) once, for a sweep whose runs read the same (entry, layer)
    many times: `read_layer` reads the whole layer for any row selection, so this is the per-run read cost
    paid once. Also keeps the prompt features of text entries (zero-shot evaluation)."""

    def __init__(self) -> None:
        self.layers: dict[tuple[str, int], np.ndarray] = {}
        self.prompts: dict[tuple[str, tuple[str, ...]], list[np.ndarray]] = {}

    def rows(self, entry: FeatureEntry, layer: int, rows: np.ndarray) -> np.ndarray:
        key = (entry.key, int(layer))
        if key not in self.layers:
            self.layers[key] = entry.read_layer(layer)
        data = self.layers[key]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(data)):
            raise StratalignError(f"row index out of range for {entry.key} ({len(data)} rows)")
        return data[rows].astype(np.float32)


def subset_tensors(subset: PairRows) -> dict[str, Any]:
    """The exact training rows, saved with the weights (reproducibility, CoMM probes on reload)."""
    return {SUBSET_KEYS[0]: torch.from_numpy(subset.image_rows.astype(np.int64)),
            SUBSET_KEYS[1]: torch.from_numpy(subset.caption_rows.astype(np.int64))}


def split_run_tensors(tensors: dict[str, Any]) -> tuple[dict[str, Any], PairRows]:
    """(model tensors, training rows) of a saved run."""
    model = {k: v for k, v in tensors.items() if k not in SUBSET_KEYS}
    return model, PairRows(tensors[SUBSET_KEYS[0]].numpy(), tensors[SUBSET_KEYS[1]].numpy())


def train_features_of(store: FeatureStore, run: ResolvedRun, subset: PairRows) -> tuple[np.ndarray, ...]:
    """(image features, text features, labels) of a run's training pairs."""
    v, t = store.entry(run.vision_entry), store.entry(run.text_entry)
    labels = store.dataset(run.dataset).images["label"].to_numpy()[subset.image_rows]
    return gather(v, run.vision_layer, subset.image_rows), gather(t, run.text_layer, subset.caption_rows), labels
