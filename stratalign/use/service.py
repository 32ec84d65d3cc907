"""The warm state of `stratalign serve`: every (run, dataset) loaded once at start-up and held.

At start-up, per run: the model (heads), both encoders (loaded, checked against the run's weights hashes and run
once, so the first request pays no load), the dataset's image index (from the store, built there once when
missing), the zero-shot class embeddings of the run's dataset; once for the dataset: its columns (`Gallery`: ids,
first captions, image files behind the containment rule). Requests then only encode their query and search:
concurrent queries of a run are encoded and searched as one batch (use.batcher).

Every input is checked against `Limits` first; a refused one raises `Refused` with the HTTP status and the
reason (the API answers it as 4xx JSON).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore
from stratalign.use.batcher import Batcher
from stratalign.use.fast import QueryModel
from stratalign.use.inputs import image_from_bytes
from stratalign.use.model import AlignedModel, classify_embeddings
from stratalign.use.search import DatasetIndex, Gallery, Hit, dataset_index

# text batches: QUERY_WORKERS batches encoded at once, each on QUERY_THREADS onnxruntime threads. Measured on the
# busy 2-core machine (benchmarks/serve_load.py --variants 1x1 1x2 2x1, alternated): 2 threads per batch doubled
# the CPU per request (spinning threads) and p95; a second worker gave no lower p95 in 3 of 4 runs
QUERY_THREADS = 1
QUERY_WORKERS = 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_query_chars: int = 1000
    max_k: int = 100
    max_upload_bytes: int = 10 * 2 ** 20
    max_texts: int = 64
    max_classes: int = 1000


class Refused(StratalignError):
    """A request outside the limits or otherwise unusable: the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RunView:
    """One run's warm parts: model, image index, class embeddings, and the batchers of its queries. Texts are
    encoded by `query`: on the CPU the run's ONNX text tower and head (use.fast: kept in the store, exported at the
    first start), else the torch model."""

    def __init__(self, model: AlignedModel, index: DatasetIndex, limits: Limits, store: FeatureStore | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.model, self.index, self.limits = model, index, limits
        self.classes: list[str] = []
        self.class_emb: np.ndarray | None = None
        if not model.is_fusion and (model.card.get("zero_shot") or {}).get("classes"):
            self.classes, self.class_emb = model.class_embeddings()
        self.query: AlignedModel | QueryModel = model
        if store is not None and model.device.type == "cpu":
            self.query = QueryModel(model.card, model.heads_bytes, store, lambda: model, threads=QUERY_THREADS,
                                    progress=progress)
        self.text_search = Batcher(lambda qs: self._search(self.query.encode_text(qs)), name=f"text:{model.run_id}",
                                   workers=QUERY_WORKERS if isinstance(self.query, QueryModel) else 1)
        self.image_search = Batcher(lambda ims: self._search(model.encode_image(ims)), name=f"image:{model.run_id}")
        self.image_embed = Batcher(lambda ims: list(model.encode_image(ims)), name=f"embed:{model.run_id}")

    def _search(self, q: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        k = min(self.limits.max_k, len(self.index.rows))
        scores, pos = self.index.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return list(zip(scores, pos))

    def warm(self) -> None:
        """Load both encoders and run each once (allocations, lazy kernels) before the first request."""
        from PIL import Image

        self.query.encode_text(["warm up"])
        self.model.encode_image([Image.new("RGB", (32, 32), (255, 255, 255))])

    def info(self) -> dict[str, Any]:
        m = self.model
        metrics = {k: float(v) for k, v in (m.card.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and ("@" in k or k.startswith("zs_"))}
        return {"run_id": m.run_id, "objective": m.card.get("objective"), "head": m.card.get("head"),
                "dim": m.dim, "temperature": m.temperature, "classes": len(self.classes), "metrics": metrics,
                "index_source": self.index.source, "gallery": int(len(self.index.rows)),
                "text_query_path": "onnx" if isinstance(self.query, QueryModel) and self.query.runs_onnx("text")
                else "torch",
                "text_batches": self.text_search.batches, "text_queries": int(sum(self.text_search.sizes))}


class Service:
    """Runs x one dataset, loaded once (see the module docstring)."""

    def __init__(self, store: FeatureStore, models: Sequence[AlignedModel], dataset: str, split: str | None = None,
                 *, limits: Limits = Limits(), build: bool = True, warm: bool = True,
                 progress: Callable[[str], None] | None = None) -> None:
        if not models:
            raise StratalignError("serve needs at least one run")
        self.store, self.dataset, self.split, self.limits = store, dataset, split, limits
        self.gallery = Gallery(store.dataset(dataset))
        self.runs: dict[str, RunView] = {}
        for m in models:
            if m.run_id in self.runs:
                raise StratalignError(f"run {m.run_id} is given twice")
            self.runs[m.run_id] = RunView(m, dataset_index(store, m, dataset, "image", split, build=build), limits,
                                          store, progress)
        if warm:
            for view in self.runs.values():
                view.warm()

    # --- checks -----------------------------------------------------------------------------------------
    def views(self, runs: Sequence[str] | None) -> list[RunView]:
        if not runs:
            return list(self.runs.values())
        out = []
        for r in runs:
            hits = [v for rid, v in self.runs.items() if rid.startswith(r)]
            if len(hits) != 1:
                raise Refused(404 if not hits else 422, f"run {r!r} is {'not served' if not hits else 'ambiguous'}; "
                                                         f"served: {', '.join(self.runs)}")
            out.append(hits[0])
        return out

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise Refused(422, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def check_query(self, q: str) -> str:
        if not q or not q.strip():
            raise Refused(422, "empty query: give a text to search with")
        if len(q) > self.limits.max_query_chars:
            raise Refused(413, f"query is {len(q)} characters, more than the {self.limits.max_query_chars} allowed")
        return q

    def image(self, data: bytes) -> Any:
        if not data:
            raise Refused(422, "empty upload: send the image file's bytes as the request body")
        if len(data) > self.limits.max_upload_bytes:
            raise Refused(413, f"upload is {len(data)} bytes, more than the {self.limits.max_upload_bytes} allowed")
        try:
            return image_from_bytes(data)
        except StratalignError as exc:
            raise Refused(422, str(exc)) from None

    # --- requests ------------------------------------------------------------------------------------------
    def _results(self, view: RunView, found: tuple[np.ndarray, np.ndarray], k: int) -> dict[str, Any]:
        scores, pos = found
        hits: list[Hit] = self.gallery.hits(view.index, scores[None, :k], pos[None, :k], paths=False)[0]
        return {"run_id": view.model.run_id, "objective": view.model.card.get("objective"),
                "hits": [{"rank": i + 1, "row": h.image_row, "image_id": h.image_id, "score": h.score,
                          "caption": h.caption, "image_url": f"/image/{h.image_row}"} for i, h in enumerate(hits)]}

    def search_text(self, q: str, k: int = 8, runs: Sequence[str] | None = None) -> dict[str, Any]:
        """Top-k images of the gallery for a text, per run."""
        self.check_query(q)
        self.check_k(k)
        views = self.views(runs)
        found = [v.text_search.submit(q) for v in views]  # every run's batcher at once
        return {"query": q, "k": k, "results": [self._results(v, f.result(60), k) for v, f in zip(views, found)]}

    async def search_text_async(self, q: str, k: int = 8, runs: Sequence[str] | None = None) -> dict[str, Any]:
        """`search_text` for an event loop: the query waits for its batches without holding a thread."""
        self.check_query(q)
        self.check_k(k)
        views = self.views(runs)
        found = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(v.text_search.submit(q)) for v in views)), 60)
        return {"query": q, "k": k, "results": [self._results(v, f, k) for v, f in zip(views, found)]}

    def search_image(self, data: bytes, k: int = 8, runs: Sequence[str] | None = None) -> dict[str, Any]:
        """Top-k images of the gallery for an uploaded image, per run."""
        self.check_k(k)
        image = self.image(data)
        views = self.views(runs)
        return {"query": None, "k": k, "results": [self._results(v, v.image_search(image), k) for v in views]}

    def classify(self, data: bytes, k: int = 5, classes: Sequence[str] | None = None,
                 runs: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Top-k classes with probabilities (softmax at the run's temperature) of an uploaded image, per run:
        among `classes` when given, else the run's dataset's classes."""
        self.check_k(k)
        if classes is not None:
            classes = [c.strip() for c in classes if c.strip()]
            if not classes or len(classes) > self.limits.max_classes:
                raise Refused(422, f"give 1 to {self.limits.max_classes} class names, got {len(classes)}")
        image = self.image(data)
        out = []
        for v in self.views(runs):
            if v.model.is_fusion:
                raise Refused(422, f"run {v.model.run_id} is a CoMM fusion model: it has no zero-shot classifier")
            if classes is None:
                if v.class_emb is None:
                    raise Refused(422, f"run {v.model.run_id}'s dataset has no classes: give classes=a,b,c")
                names, emb = v.classes, v.class_emb
            else:
                names, emb = v.model.class_embeddings(classes)
            res = classify_embeddings(v.image_embed(image)[None, :], names, emb, v.model.temperature)
            out.append({"run_id": v.model.run_id, "temperature": res.temperature,
                        "top": [{"label": c, "probability": p, "score": s} for c, p, s in res.top(min(k, len(names)))[0]]})
        return out

    def embed_texts(self, texts: Sequence[str], run: str | None = None) -> dict[str, Any]:
        """Unit embeddings of texts in one run's space (the first served run by default)."""
        if not texts or len(texts) > self.limits.max_texts:
            raise Refused(422 if not texts else 413, f"give 1 to {self.limits.max_texts} texts, got {len(texts)}")
        for t in texts:
            self.check_query(t)
        view = self.views([run] if run else None)[0]
        z = view.query.encode_text(list(texts))
        return {"run_id": view.model.run_id, "dim": int(z.shape[1]), "embeddings": z.tolist()}

    def image_path(self, row: int) -> str:
        """The file of an image row, through the containment rule (OutsideRoots / StratalignError otherwise)."""
        return self.gallery.media.path(row)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "images": len(self.gallery.ids),
                "limits": asdict(self.limits), "runs": [v.info() for v in self.runs.values()]}
