"""A run's query side without torch: ONNX graphs kept in the store, run by onnxruntime (the fast path of
`search` and of the server's text queries).

A text query needs the text tower cut at the run's chosen layer and pooled (then rounded through the stored
feature dtype, as `AlignedModel.features` does) and the run's text head; a query the store already holds (a
dataset caption, an image's bytes: use.cached) needs the head only. Both are exported once from the torch
model (use.onnx_export: that first time imports torch and says so) and checked against its forward pass, then
kept in the store (store.onnx_cache), so every later query imports neither torch nor transformers:

    model = QueryModel.from_run(store, run_id)          # card + heads hash: no torch
    z = model.encode_text(["a red heart"])               # tokenizers + onnxruntime + numpy

What it cannot run without torch (new images; a CoMM fusion model, whose heads are not exported; a store it may
not write the first export to) it hands to the run's `AlignedModel`, loaded on first need (`fallback`).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store import onnx_cache
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import onnx_key
from stratalign.use import onnx_export
from stratalign.use.card import MODALITIES, Tower, check_card, run_card
from stratalign.use.onnx_export import ENCODING_FIELDS, EXPORTER, NotExportable

TEXT_BATCH = 256


def text_tower_key(tower: Tower) -> str:
    """The cache key of a text tower cut at its layer: the encoder's metadata (weights sha256, preprocessing),
    layer, pooling and the exporter's recipe; runs on the same encoder and layer share it."""
    return onnx_key("text", {"encoder": tower.encoder, "metadata": tower.metadata, "layer": tower.layer,
                             "pooling": tower.pooling, "exporter": EXPORTER})


def head_key(heads: bytes, modality: str) -> str:
    """The cache key of one modality's head of a run: its weights' sha256 and the modality."""
    return onnx_key("head", {"heads_sha256": hashlib.sha256(heads).hexdigest(), "modality": modality,
                             "exporter": EXPORTER})


class QueryModel:
    """The parts of an `AlignedModel` a query needs, from ONNX graphs in the store (see the module docstring).
    Duck-types AlignedModel for use.search and use.cached: run_id, card, towers, features, encode_features,
    encode_text, encode_image."""

    def __init__(self, card: dict[str, Any], heads: bytes, store: FeatureStore,
                 fallback: Callable[[], Any], *, threads: int = 0,
                 progress: Callable[[str], None] | None = None) -> None:
        check_card(card)
        self.card, self.heads, self.store = card, heads, store
        self.run_id = str(card.get("run_id", "?"))
        self.towers = {m: Tower.from_card(card, m) for m in MODALITIES}
        self.threads = threads
        self.progress = progress
        self._fallback_factory = fallback
        self._fallback: Any = None
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self.exported: list[str] = []  # keys this process exported (tests and progress)

    @classmethod
    def from_run(cls, store: FeatureStore, run: str, *, device: str = "cpu", threads: int = 0,
                 progress: Callable[[str], None] | None = None) -> "QueryModel":
        """The query side of a finished run in a store (a full id or a unique prefix)."""
        card, heads = run_card(store, run)

        def fallback() -> Any:
            from stratalign.use.model import AlignedModel

            return AlignedModel(card, heads, device=device)

        return cls(card, heads, store, fallback, threads=threads, progress=progress)

    # --- the torch model, for what ONNX does not cover --------------------------------------------------------
    def fallback(self) -> Any:
        """The run's AlignedModel (imports torch), loaded once."""
        with self._lock:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            return self._fallback

    # --- sessions ---------------------------------------------------------------------------------------------
    def runs_onnx(self, part: str) -> bool:
        """Whether "text" (the text tower) or "head:<modality>" has answered through its ONNX graph so far."""
        return self._sessions.get(part) is not None

    def _session(self, part: str) -> Any:
        """The onnxruntime session of "text" (the cut text tower) or "head:<modality>", read from the store or
        exported into it the first time; NotExportable when there is none."""
        with self._lock:
            if part in self._sessions:
                if self._sessions[part] is None:
                    raise NotExportable(f"no ONNX graph for {part} of run {self.run_id}")
                return self._sessions[part]
        key = text_tower_key(self.towers["text"]) if part == "text" else head_key(self.heads, part.split(":")[1])
        found = onnx_cache.load(self.store, key)
        if found is None:
            found = self._export(part, key)
        files, _ = found
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        try:  # loaded from bytes: onnxruntime refuses external data (a crafted graph cannot name files elsewhere)
            session = ort.InferenceSession(files["model.onnx"], opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeError kinds
            raise StratalignError(f"the store's ONNX graph onnx/{key} does not load ({str(err).splitlines()[0][:200]}): "
                                  "remove that folder and search again (it is exported anew)") from None
        with self._lock:
            if part == "text":
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
            self._sessions[part] = session
        return session

    def _export(self, part: str, key: str) -> tuple[dict[str, bytes], dict[str, Any]]:
        if self.store.mode != "a":
            self._sessions[part] = None
            raise NotExportable(f"the store is read-only: no ONNX graph of {part} can be kept for run {self.run_id}")
        if self.progress is not None:
            self.progress(f"exporting {'the text tower' if part == 'text' else 'the ' + part.split(':')[1] + ' head'}"
                          f" of {self.run_id} to ONNX once (this first time loads torch; later queries do not)")
        try:
            if part == "text":
                files, meta = onnx_export.text_tower(self.fallback())
            else:
                files, meta = onnx_export.head(self.fallback(), part.split(":")[1])
        except NotExportable:
            self._sessions[part] = None
            raise
        onnx_cache.save(self.store, key, files, meta)
        self.exported.append(key)
        return files, meta

    # --- queries ----------------------------------------------------------------------------------------------
    def encode_features(self, x: np.ndarray, modality: str) -> np.ndarray:
        """Unit-norm embeddings of pooled layer features through the run's head (the ONNX graph)."""
        x = np.asarray(x, dtype=np.float32)
        tower = self.towers[modality]
        if x.ndim != 2 or x.shape[1] != tower.dim:
            raise StratalignError(f"{modality} features must be (n, {tower.dim}), got {x.shape}")
        try:
            session = self._session(f"head:{modality}")
        except NotExportable:
            return self.fallback().encode_features(x, modality)
        return session.run(None, {"features": np.ascontiguousarray(x)})[0]

    def features(self, items: Any, modality: str, batch_size: int | None = None) -> np.ndarray:
        """The chosen layer's pooled features, rounded through the stored dtype (AlignedModel.features): texts
        through the ONNX tower, anything else through the torch model."""
        if modality != "text":
            return self.fallback().features(items, modality, batch_size)
        from stratalign.use.inputs import texts_of

        try:
            session = self._session("text")
        except NotExportable:
            return self.fallback().features(items, modality, batch_size)
        texts = texts_of(items)
        size = batch_size or TEXT_BATCH
        out = [self._run_text(session, texts[s:s + size]) for s in range(0, len(texts), size)]
        tower = self.towers["text"]
        return np.concatenate(out).astype(tower.feature_dtype).astype(np.float32)

    def _run_text(self, session: Any, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch([str(t) for t in texts])
        feeds = {i.name: np.asarray([getattr(e, ENCODING_FIELDS[i.name]) for e in encodings], dtype=np.int64)
                 for i in session.get_inputs()}
        return session.run(None, feeds)[0]

    def encode_text(self, texts: Any, batch_size: int | None = None) -> np.ndarray:
        """(n, d) float32 unit rows of texts."""
        return self.encode_features(self.features(texts, "text", batch_size), "text")

    def encode_image(self, images: Any, batch_size: int | None = None) -> np.ndarray:
        """(n, d) float32 unit rows of images (the image encoder runs in torch)."""
        return self.encode_features(self.features(images, "image", batch_size), "image")
