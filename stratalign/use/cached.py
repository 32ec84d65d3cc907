"""Features the store already holds, used in place of running an encoder (the fast CLI path).

A run's towers read one layer of one feature entry each. For a dataset extracted with the same encoder
(same weights and preprocessing) and pooling, a caption of the dataset or a file with the bytes of one of its
images (matched by the content hash ingest recorded) has its layer features in the store: `CachedFeatures`
reads those rows and runs the encoder only for the rest. The cached features are what the run's heads were
trained and evaluated on, so they equal a fresh forward pass within float16 storage rounding
(tests/use/test_model.py).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import FeatureEntry, FeatureStore

if TYPE_CHECKING:  # an AlignedModel, or a use.fast.QueryModel (no torch)
    from stratalign.use.model import AlignedModel


def cached_entry(store: FeatureStore, model: AlignedModel, ds: PairDataset, modality: str) -> FeatureEntry | None:
    """The complete entry of a dataset holding the model's tower features (same encoder metadata and pooling, the
    chosen layer present), or None."""
    tower = model.towers[modality]
    try:
        entries = store.complete_entries(ds.name, tower.encoder, tower.pooling, modality)
    except StratalignError:  # not extracted (or not completely)
        return None
    for entry in entries:
        if entry.spec.encoder == tower.metadata and tower.layer < len(entry.spec.dims):
            return entry
    return None


class CachedFeatures:
    """A model's layer features of one dataset's captions and images, looked up by text and by image bytes."""

    def __init__(self, store: FeatureStore, model: AlignedModel, dataset: str) -> None:
        self.model = model
        self.ds = store.dataset(dataset)
        self.entries = {m: cached_entry(store, model, self.ds, m) for m in ("image", "text")}
        self._text_rows: dict[str, int] | None = None
        self._sha_rows: dict[str, int] | None = None
        self.hits = 0  # items answered from the store (for tests and progress lines)

    def rows_of(self, items: Sequence[Any], modality: str) -> list[int | None]:
        """The dataset row holding each item's features, or None (text: an equal caption; image: a path or bytes
        whose content hash is one of the dataset's images)."""
        if self.entries.get(modality) is None:
            return [None] * len(items)
        if modality == "text":
            if self._text_rows is None:
                self._text_rows = {}
                for row, t in enumerate(self.ds.captions["text"].to_list()):
                    self._text_rows.setdefault(t, row)
            return [self._text_rows.get(t) if isinstance(t, str) else None for t in items]
        if self._sha_rows is None:
            self._sha_rows = {}
            for row, sha in enumerate(self.ds.images["sha"].to_list()):
                self._sha_rows.setdefault(sha, row)
        return [self._sha_rows.get(_sha(x)) for x in items]

    def features(self, items: Sequence[Any] | Any, modality: str) -> np.ndarray:
        """(n, layer dim) float32 features of the items: store rows where it holds them, the encoder for the rest."""
        items = [items] if isinstance(items, (str, bytes)) else list(items)
        if not items:
            raise StratalignError(f"no {modality}s to encode")
        rows = self.rows_of(items, modality)
        tower = self.model.towers[modality]
        out = np.empty((len(items), tower.dim), np.float32)
        known = [i for i, r in enumerate(rows) if r is not None]
        if known:
            entry = self.entries[modality]
            out[known] = entry.read_layer(tower.layer, np.asarray([rows[i] for i in known])).astype(np.float32)
        rest = [i for i, r in enumerate(rows) if r is None]
        if rest:
            out[rest] = self.model.features([items[i] for i in rest], modality)
        self.hits += len(known)
        return out


def _sha(item: Any) -> str | None:
    """The ingest content hash (blake2b-128, store.media) of an image file or its bytes; None for anything else."""
    data = item
    if not isinstance(item, bytes):
        if not isinstance(item, str):
            return None
        try:
            with open(item, "rb") as f:
                data = f.read()
        except OSError:
            return None  # the encoder path reports the unreadable file in one line
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cached_class_embeddings(store: FeatureStore, model: AlignedModel, classes: Sequence[str] | None = None,
                            templates: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """`model.class_embeddings`, with the prompts' text features from the store's prompt cache when it holds
    them (extract fills it for datasets with classes): the text encoder runs only on a cache miss."""
    from stratalign.core.scoring import class_embeddings
    from stratalign.store import prompt_cache
    from stratalign.store.keys import prompt_key

    if model.is_fusion:
        return model.class_embeddings(classes, templates)  # its one-line refusal
    names, temps = model.class_prompts(classes, templates)
    tower = model.towers["text"]
    key_of_entry = (model.card["towers"]["text"] or {}).get("entry")
    try:
        spec = store.entry(key_of_entry).spec
    except (StratalignError, TypeError):
        return model.class_embeddings(names, temps)
    prompts = [t.format(c) for c in names for t in temps]
    layers = prompt_cache.load(store, prompt_key(spec.encoder, spec.pooling, prompts), len(spec.dims))
    if layers is None or spec.encoder != tower.metadata:
        return model.class_embeddings(names, temps)
    z = model.encode_features(layers[tower.layer], "text").reshape(len(names), len(temps), -1)
    return names, class_embeddings(z)
