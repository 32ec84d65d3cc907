"""Search a dataset in a run's space: a FAISS index of its images (or captions), kept in the store and reused.

The vectors of a dataset the run's encoders were extracted on come from the cached features (store -> heads:
equal to `AlignedModel.encode_image` of the files within float16 rounding, tests/use/test_model.py); a dataset
without those features is encoded through the model. The index is exact (inner product over unit vectors), so
text -> image search over the test split ranks the gallery exactly as the run's t2i retrieval metric does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.datasets import SPLITS, PairDataset
from stratalign.store.feature_store import FeatureStore
from stratalign.store.indexes import index_key, load_index, save_index
from stratalign.use.model import AlignedModel


@dataclass(frozen=True)
class DatasetIndex:
    """A built or reused index: the FAISS index, the dataset rows of its vectors, where they came from."""

    index: Any
    rows: np.ndarray
    modality: str
    split: str | None
    key: str
    reused: bool
    source: str


@dataclass(frozen=True)
class Hit:
    """One search result: its dataset row, cosine score, image path and id, and the caption (or first caption)."""

    row: int
    score: float
    image_id: str
    path: str
    caption: str


def _rows(ds: PairDataset, modality: str, split: str | None) -> np.ndarray:
    if split is not None and split not in SPLITS:
        raise StratalignError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or none for all rows)")
    rows = ds.image_rows(split) if modality == "image" else ds.pairs(split)[1]
    if len(rows) == 0:
        raise StratalignError(f"dataset {ds.name!r} has no {modality}s in split {split!r}")
    return np.asarray(rows, dtype=np.int64)


def dataset_vectors(store: FeatureStore, model: AlignedModel, ds: PairDataset, modality: str,
                    rows: np.ndarray) -> tuple[np.ndarray, str]:
    """(unit embeddings of the rows, source): from cached features when the dataset was extracted with the run's
    encoder (same weights and preprocessing) and pooling, else by encoding the files / captions."""
    tower = model.towers[modality]
    try:
        entries = store.complete_entries(ds.name, tower.encoder, tower.pooling, modality)
    except StratalignError:  # not extracted (or not completely): encode the files below
        entries = []
    for entry in entries:
        if entry.spec.encoder == tower.metadata and tower.layer < len(entry.spec.dims):
            x = entry.read_layer(tower.layer, rows).astype(np.float32)
            return model.encode_features(x, modality), f"cached features {entry.key}"
    if modality == "image":
        return model.encode_image(ds.images["path"].to_numpy()[rows].tolist()), "encoded images"
    return model.encode_text(ds.captions["text"].to_numpy()[rows].tolist()), "encoded captions"


def dataset_index(store: FeatureStore, model: AlignedModel, dataset: str, modality: str = "image",
                  split: str | None = None) -> DatasetIndex:
    """The index of a dataset's images (or captions) in the model's space: reused from the store when there,
    else built and saved (when the store is writable)."""
    import faiss

    ds = store.dataset(dataset)
    key = index_key(model.run_id, ds.fingerprint, modality, split)
    found = load_index(store, key)
    if found is not None:
        data, meta = found
        return DatasetIndex(faiss.deserialize_index(np.array(data)), np.asarray(meta["rows"], np.int64), modality,
                            split, key, True, str(meta.get("source")))
    if store.mode == "a":  # a write through a link: refused before the vectors are computed
        store.loc.refuse_links("indexes", key)
    rows = _rows(ds, modality, split)
    z, source = dataset_vectors(store, model, ds, modality, rows)
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(np.ascontiguousarray(z, dtype=np.float32))
    if store.mode == "a":
        meta = {"run_id": model.run_id, "dataset": dataset, "dataset_fingerprint": ds.fingerprint,
                "modality": modality, "split": split, "rows": rows.tolist(), "source": source, "metric": "inner product"}
        save_index(store, key, faiss.serialize_index(index).tobytes(), meta)
    return DatasetIndex(index, rows, modality, split, key, False, source)


def search(store: FeatureStore, model: AlignedModel, dataset: str, queries: Sequence[Any], k: int = 10, *,
           by: str = "text", split: str | None = None) -> list[list[Hit]]:
    """Top-k hits per query: texts -> the dataset's images (by="text"), or images -> its captions (by="image")."""
    if by not in ("text", "image"):
        raise StratalignError(f"search by text or image, not {by!r}")
    if k < 1:
        raise StratalignError(f"-k must be at least 1, got {k}")
    target = "image" if by == "text" else "text"
    idx = dataset_index(store, model, dataset, target, split)
    q = model.encode_text(queries) if by == "text" else model.encode_image(queries)
    scores, pos = idx.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(idx.rows)))
    return hits_of(store.dataset(dataset), idx, scores, pos)


def hits_of(ds: PairDataset, idx: DatasetIndex, scores: np.ndarray, pos: np.ndarray) -> list[list[Hit]]:
    """FAISS results as Hits (an image hit shows its first caption; a caption hit its image)."""
    ids, paths = ds.images["image_id"].to_list(), ds.images["path"].to_list()
    texts, cap_image = ds.captions["text"].to_list(), ds.captions["image_row"].to_list()
    first: dict[int, str] = {}
    for t, r in zip(texts, cap_image):
        first.setdefault(int(r), t)
    out = []
    for srow, prow in zip(scores, pos):
        hits = []
        for s, p in zip(srow, prow):
            if p < 0:
                continue
            row = int(idx.rows[p])
            img = row if idx.modality == "image" else int(cap_image[row])
            caption = first.get(img, "") if idx.modality == "image" else texts[row]
            hits.append(Hit(row, float(s), ids[img], paths[img], caption))
        out.append(hits)
    return out
