"""Search a dataset in a run's space: a FAISS index of its images (or captions), kept in the store and reused.

The vectors of a dataset the run's encoders were extracted on come from the cached features (store -> heads:
equal to `AlignedModel.encode_image` of the files within float16 rounding, tests/use/test_model.py); a dataset
without those features is encoded through the model (its image files opened through the store's containment
rule, store.containment). The index type is chosen by size (`build_index`): exact inner product up to
`EXACT_MAX` vectors, so text -> image search over the test split ranks the gallery exactly as the run's t2i
retrieval metric does; an IVF index above it (benchmarks/serve_load.py measures its recall@10 against exact).
A `Gallery` holds a dataset's columns once (ids, first captions, contained image paths) for many queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.containment import DatasetMedia, OutsideRoots
from stratalign.store.datasets import SPLITS, PairDataset
from stratalign.store.feature_store import FeatureStore
from stratalign.store.indexes import index_key, load_index, save_index
from stratalign.use.cached import CachedFeatures, cached_entry

if TYPE_CHECKING:  # an AlignedModel, or a use.fast.QueryModel (no torch)
    from stratalign.use.model import AlignedModel

EXACT_MAX = 200_000  # up to this many vectors an exact (flat) index; above, IVF (benchmarks/serve_load.py)
PROBE_FRACTION = 4   # IVF visits 1/4 of its sqrt(n) lists: recall@10 0.97 on the 1M benchmark gallery (README)


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
    """One search result: its dataset row, cosine score, image id and path, and the caption (or first caption).
    `path` is None when the row's image path is outside the dataset's image roots (a crafted table)."""

    row: int
    score: float
    image_id: str
    path: str | None
    caption: str
    image_row: int


class Gallery:
    """A dataset's columns read once for many queries: image ids, captions, each image's first caption, and its
    image files behind the containment rule."""

    def __init__(self, ds: PairDataset) -> None:
        self.name = ds.name
        self.ids = ds.images["image_id"].to_list()
        self.texts = ds.captions["text"].to_list()
        self.cap_image = ds.captions["image_row"].to_list()
        self.first: dict[int, str] = {}
        for t, r in zip(self.texts, self.cap_image):
            self.first.setdefault(int(r), t)
        self.media = DatasetMedia.of(ds)

    def hits(self, idx: DatasetIndex, scores: np.ndarray, pos: np.ndarray, *, paths: bool = True) -> list[list[Hit]]:
        """FAISS results as Hits (an image hit shows its first caption; a caption hit its image); paths=False leaves
        `path` None without checking it (the API links images by row, and `/image/<row>` checks the path then)."""
        out = []
        for srow, prow in zip(scores, pos):
            hits = []
            for s, p in zip(srow, prow):
                if p < 0:
                    continue
                row = int(idx.rows[p])
                img = row if idx.modality == "image" else int(self.cap_image[row])
                caption = self.first.get(img, "") if idx.modality == "image" else self.texts[row]
                path: str | None = None
                if paths:
                    try:
                        path = self.media.path(img)
                    except OutsideRoots:
                        pass
                hits.append(Hit(row, float(s), self.ids[img], path, caption, img))
            out.append(hits)
        return out


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
    encoder (same weights and preprocessing) and pooling, else by encoding the files (contained) / captions."""
    entry = cached_entry(store, model, ds, modality)
    if entry is not None:
        x = entry.read_layer(model.towers[modality].layer, rows).astype(np.float32)
        return model.encode_features(x, modality), f"cached features {entry.key}"
    if modality == "image":
        return model.encode_image(DatasetMedia.of(ds).check(rows)), "encoded images"
    return model.encode_text(ds.captions["text"].to_numpy()[rows].tolist()), "encoded captions"


def build_index(z: np.ndarray, exact_max: int = EXACT_MAX, nprobe: int | None = None) -> tuple[Any, str]:
    """(FAISS index of unit rows, its kind): exact inner product up to `exact_max` rows; above, an inverted
    file (IVF, sqrt(n) lists trained by k-means on a sample of 40 per list) searched with `nprobe` lists
    (default: a quarter of them)."""
    import faiss

    z = np.ascontiguousarray(z, dtype=np.float32)
    n, d = z.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
        index.add(z)
        return index, "flat"
    nlist = int(round(math.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
    index.train(z[np.sort(sample)])
    index.add(z)
    index.nprobe = nprobe or max(1, nlist // PROBE_FRACTION)
    return index, f"ivf{nlist},nprobe{index.nprobe}"


def dataset_index(store: FeatureStore, model: AlignedModel, dataset: str, modality: str = "image",
                  split: str | None = None, *, build: bool = True) -> DatasetIndex:
    """The index of a dataset's images (or captions) in the model's space: reused from the store when there,
    else built (unless build=False: a one-line error) and saved when the store is writable."""
    import faiss

    ds = store.dataset(dataset)
    key = index_key(model.run_id, ds.fingerprint, modality, split)
    found = load_index(store, key)
    if found is not None:
        data, meta = found
        index = faiss.deserialize_index(np.array(data))
        if "nprobe" in meta:
            faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
        return DatasetIndex(index, np.asarray(meta["rows"], np.int64), modality, split, key, True,
                            str(meta.get("source")))
    if store.mode == "a":  # a write through a link: refused before the vectors are computed
        store.loc.refuse_links("indexes", key)
    if not build:
        raise StratalignError(f"no {modality} index of run {model.run_id} on dataset {dataset!r}"
                              f"{f' split {split}' if split else ''} in {store.url}; build it with `stratalign index "
                              f"--run {model.run_id} --dataset {dataset}{' --captions' if modality == 'text' else ''}`")
    rows = _rows(ds, modality, split)
    z, source = dataset_vectors(store, model, ds, modality, rows)
    index, kind = build_index(z)
    if store.mode == "a":
        meta = {"run_id": model.run_id, "dataset": dataset, "dataset_fingerprint": ds.fingerprint,
                "modality": modality, "split": split, "rows": rows.tolist(), "source": source, "metric": "inner product"}
        if kind != "flat":
            meta.update(index_type=kind, nprobe=int(faiss.extract_index_ivf(index).nprobe))
        save_index(store, key, faiss.serialize_index(index).tobytes(), meta)
    return DatasetIndex(index, rows, modality, split, key, False, source)


def search(store: FeatureStore, model: AlignedModel, dataset: str, queries: Sequence[Any], k: int = 10, *,
           by: str = "text", split: str | None = None, cached: CachedFeatures | None = None) -> list[list[Hit]]:
    """Top-k hits per query: texts -> the dataset's images (by="text"), or images -> its captions (by="image").
    With `cached`, queries the store already holds (a caption of the dataset, a file with the bytes of one of its
    images) take their features from the store: no encoder runs for them."""
    if by not in ("text", "image"):
        raise StratalignError(f"search by text or image, not {by!r}")
    if k < 1:
        raise StratalignError(f"-k must be at least 1, got {k}")
    target = "image" if by == "text" else "text"
    idx = dataset_index(store, model, dataset, target, split)
    if cached is not None:
        q = model.encode_features(cached.features(queries, by), by)
    else:
        q = model.encode_text(queries) if by == "text" else model.encode_image(queries)
    scores, pos = idx.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(idx.rows)))
    return Gallery(store.dataset(dataset)).hits(idx, scores, pos)
