"""AlignedModel: a trained run as a model to use: embed new images and texts, classify, compare.

    model = AlignedModel.from_run(store, "clip-linear-chosen-n1219-s0-5ac1")   # or .from_pretrained("exported/")
    z = model.encode_image(["heart.png"])                                # (n, d) float32, unit rows
    t = model.encode_text(["a red heart"], return_tensors="pt")         # a torch tensor
    z = model.encode_image(model.preprocess([pil_image]))               # open_clip style: batch, then encode
    model.similarity(["heart.png"], ["a red heart", "a cat"])           # cosine, (images, texts)
    model.classify(["heart.png"], ["heart", "cat"]).top(2)             # [(class, probability, cosine), ...]

Classification probabilities are softmax(cosine / tau) at the run's training temperature (`temperature`).

Each encoder runs only up to the run's chosen layer (`Encoder.forward_layer`: the later blocks never run where
the encoder can stop early, see `truncates`; otherwise the full forward pass), pools as extraction does
(docs/method.md § 1), and the pooled features pass through the dtype they were stored in at training (float16
by default) before the head: the head sees exactly what the cached-feature path gives it, so embedding a
dataset's own rows equals store features -> head up to the encoder's own numerics. On CUDA the encoders run
under autocast (bfloat16 where supported) as extraction does; on the CPU in float32.

CoMM runs are one fusion model, not two heads: `encode_image` / `encode_text` give the fused CLS output with
only that modality visible (the masked views CoMM's loss trains), unit-normalised; `encode_pairs` the fused
output of (image, text) pairs that CoMM is evaluated on (linear probes). CoMM has no zero-shot classifier:
`classify` refuses it.

An encoder is loaded on first use and must have the weights its features were extracted with (weights
sha256 from the card); another version is refused with one line.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load

from stratalign.core.comm import CommModel
from stratalign.core.scoring import class_embeddings
from stratalign.device import resolve_device
from stratalign.errors import StratalignError
from stratalign.stages.runs.data import SUBSET_KEYS
from stratalign.store import exports
from stratalign.store.feature_store import FeatureStore
from stratalign.train import model_from_tensors
from stratalign.train.inference import head_embedding
from stratalign.use.card import MODALITIES, Tower, check_card, model_card_markdown, run_card
from stratalign.use.inputs import images_of, texts_of

IMAGE_BATCH = 32
TEXT_BATCH = 256
DEFAULT_TAU = 0.05  # TrainConfig.tau's default, for a card that records none


@dataclass(frozen=True)
class Classification:
    """Zero-shot labels of images: `labels[i]` = `classes[indices[i]]`; `scores` (images, classes) cosines;
    `probs` their softmax at the run's training temperature (rows sum to 1)."""

    classes: list[str]
    labels: list[str]
    indices: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    temperature: float

    def top(self, k: int = 5) -> list[list[tuple[str, float, float]]]:
        """Per image, the k most likely (class, probability, cosine), most likely first."""
        if k < 1:
            raise StratalignError(f"top-k needs k >= 1, got {k}")
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(self.probs[i, j]), float(self.scores[i, j])) for j in row]
                for i, row in enumerate(order)]


class AlignedModel:
    """A trained run's encoders (cut at the chosen layers) and heads, usable without the store once exported."""

    def __init__(self, card: dict[str, Any], heads: bytes, *, device: str = "auto",
                 load: Callable[[str, str], Any] | None = None) -> None:
        check_card(card)
        self.card = card
        self.heads_bytes = heads
        self.run_id = str(card.get("run_id", "?"))
        self.device = resolve_device(device)
        try:
            tensors = st_load(heads)
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            raise StratalignError(f"heads of {self.run_id} are not readable safetensors: {type(exc).__name__}") from None
        tensors = {k: v for k, v in tensors.items() if k not in SUBSET_KEYS}  # the run's training rows ride along
        self.model = model_from_tensors(None, tensors).to(self.device).eval()
        self.towers = {m: Tower.from_card(card, m) for m in MODALITIES}
        self._load = load
        self._encoders: dict[str, Any] = {}
        self._lock = threading.Lock()  # encoders run one batch at a time (forward_layer hooks are per model)

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, store: FeatureStore, run: str, *, device: str = "auto",
                 load: Callable[[str, str], Any] | None = None) -> "AlignedModel":
        """The model of a finished run in a store (a full run id or a unique prefix)."""
        card, heads = run_card(store, run)
        return cls(card, heads, device=device, load=load)

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto",
             load: Callable[[str, str], Any] | None = None) -> "AlignedModel":
        """A model exported with `export` / `stratalign export` (no store needed)."""
        card, heads = exports.read_export(folder)
        return cls(card, heads, device=device, load=load)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "auto",
                        load: Callable[[str, str], Any] | None = None) -> "AlignedModel":
        """The Hugging Face spelling of `load`: an exported folder (model.json + heads.safetensors + README.md)."""
        return cls.load(folder, device=device, load=load)

    def export(self, folder: str | Path) -> Path:
        """Write model.json + heads.safetensors + README.md (the model card, use.card.model_card_markdown) to
        `folder` (see store.exports)."""
        card = {k: v for k, v in self.card.items() if k not in ("format", "heads_sha256")}
        return exports.write_export(folder, card, self.heads_bytes, readme=model_card_markdown(card))

    save_pretrained = export

    @property
    def temperature(self) -> float:
        """The softmax temperature of the run's contrastive training (TrainConfig.tau): classification
        probabilities are softmax(cosine / temperature), as the training loss scores pairs."""
        tau = ((self.card.get("run_config") or {}).get("train") or {}).get("tau")
        return float(tau) if isinstance(tau, (int, float)) and tau > 0 else DEFAULT_TAU

    @property
    def is_fusion(self) -> bool:
        return isinstance(self.model, CommModel)

    @property
    def dim(self) -> int:
        return int(self.encode_features(np.zeros((1, self.towers["image"].dim), np.float32), "image").shape[1])

    def __repr__(self) -> str:
        v, t = self.towers["image"], self.towers["text"]
        return (f"<AlignedModel {self.run_id}: {v.encoder} {v.layer_name} {v.pooling} | {t.encoder} {t.layer_name} "
                f"{t.pooling} | {type(self.model).__name__} on {self.device}>")

    # --- encoders ----------------------------------------------------------------------------------------
    def encoder(self, modality: str) -> Any:
        """The loaded encoder of a modality, checked to have the weights the run's features came from."""
        if modality not in MODALITIES:
            raise StratalignError(f"modality must be image or text, not {modality!r}")
        if modality not in self._encoders:
            tower = self.towers[modality]
            if self._load is None:
                from stratalign.encoders import load_encoder as load
            else:
                load = self._load
            enc = load(tower.encoder, str(self.device))
            want = tower.metadata.get("weights_sha256")
            got = enc.metadata().get("weights_sha256")
            if want != got:
                raise StratalignError(f"encoder {tower.encoder} has weights sha256 {str(got)[:12]}... but run "
                                      f"{self.run_id} was trained on {str(want)[:12]}...: install the same weights")
            self._encoders[modality] = enc
        return self._encoders[modality]

    def preprocess(self, images: Sequence[Any] | Any) -> dict[str, torch.Tensor]:
        """The image encoder's model-ready batch of images (paths, PIL images or arrays), as open_clip's
        `preprocess` gives: pass it (or its `pixel_values` tensor) to `encode_image`."""
        return self.encoder("image").preprocess(images_of(images))

    def tokenizer(self, texts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """The text encoder's tokenized batch of texts: pass it to `encode_text`."""
        return self.encoder("text").preprocess(texts_of(texts))

    def features(self, items: Any, modality: str, batch_size: int | None = None) -> np.ndarray:
        """The chosen layer's pooled features of raw items (images or texts), of a batch from `preprocess` /
        `tokenizer` (a dict of tensors), or of an image tensor (n, 3, h, w) of the encoder's own transform;
        float32 after a round trip through the stored feature dtype: the head's input, as the cached path
        reads it from the store."""
        tower = self.towers[modality]
        enc = self.encoder(modality)
        if isinstance(items, torch.Tensor) and modality == "image" and items.ndim == 4:
            items = {"pixel_values": items}
        if isinstance(items, dict):
            batches = [{k: v.to(enc.device) if isinstance(v, torch.Tensor) else v for k, v in items.items()}]
        else:
            items = images_of(items) if modality == "image" else texts_of(items)
            size = batch_size or (IMAGE_BATCH if modality == "image" else TEXT_BATCH)
            batches = (enc.preprocess(items[s:s + size]) for s in range(0, len(items), size))
        out = []
        for batch in batches:
            with self._lock, torch.inference_mode(), _autocast(self.device):
                out.append(enc.forward_layer(batch, tower.layer, tower.pooling).float().cpu().numpy())
        x = np.concatenate(out)
        return x.astype(tower.feature_dtype).astype(np.float32)

    # --- embeddings ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_features(self, x: np.ndarray, modality: str) -> np.ndarray:
        """Unit-norm embeddings of pooled layer features (the cached path: store features -> head)."""
        x = np.asarray(x, dtype=np.float32)
        tower = self.towers[modality]
        if x.ndim != 2 or x.shape[1] != tower.dim:
            raise StratalignError(f"{modality} features must be (n, {tower.dim}), got {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if self.is_fusion:
            other = torch.zeros(len(t), self.towers["text" if modality == "image" else "image"].dim, device=self.device)
            pair = (t, other) if modality == "image" else (other, t)
            z = torch.nn.functional.normalize(self.model.fuse(*pair, mask=modality), dim=-1)
        else:
            z = head_embedding(self.model.head(modality), t)
        return z.float().cpu().numpy()

    def encode_image(self, images: Any, batch_size: int | None = None, *, return_tensors: str = "np") -> Any:
        """(n, d) float32 unit rows of images: file paths, PIL images, (h, w[, c]) arrays, a `preprocess` batch
        or its (n, 3, h, w) pixel tensor; numpy, or a torch tensor with return_tensors="pt"."""
        return _out(self.encode_features(self.features(images, "image", batch_size), "image"), return_tensors)

    def encode_text(self, texts: Any, batch_size: int | None = None, *, return_tensors: str = "np") -> Any:
        """(n, d) float32 unit rows of texts (or of a `tokenizer` batch); numpy, or torch with "pt"."""
        return _out(self.encode_features(self.features(texts, "text", batch_size), "text"), return_tensors)

    @torch.no_grad()
    def encode_pairs(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """CoMM only: the fused CLS output of (image, text) pairs, both visible (what its probes score)."""
        if not self.is_fusion:
            raise StratalignError(f"run {self.run_id} has two heads, not a fusion model: use encode_image / encode_text")
        x_img, x_txt = self.features(images, "image"), self.features(texts, "text")
        if len(x_img) != len(x_txt):
            raise StratalignError(f"encode_pairs got {len(x_img)} images but {len(x_txt)} texts")
        from stratalign.train import fused_features

        return fused_features(self.model, x_img, x_txt)

    def similarity(self, images: Sequence[Any] | Any, texts: Sequence[str] | str) -> np.ndarray:
        """Cosine similarity of every image with every text, (n_images, n_texts)."""
        return self.encode_image(images) @ self.encode_text(texts).T

    # --- zero-shot classification ------------------------------------------------------------------------
    def class_prompts(self, class_names: Sequence[str] | None = None,
                      templates: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """(classes, templates): the given ones, else the run's dataset's (as its zero-shot evaluation uses)."""
        zs = self.card.get("zero_shot") or {}
        classes = list(class_names) if class_names is not None else list(zs.get("classes") or [])
        temps = list(templates) if templates is not None else list(zs.get("templates") or ["a photo of a {}."])
        if not classes or any(not str(c).strip() for c in classes):
            raise StratalignError("classify needs non-empty class names (the run's dataset has no labels to default to)"
                                  if not classes else f"empty class name in {classes!r}")
        bad = [t for t in temps if "{}" not in t]
        if bad:
            raise StratalignError(f"template {bad[0]!r} has no {{}} for the class name")
        return [str(c) for c in classes], temps

    def class_embeddings(self, class_names: Sequence[str] | None = None,
                         templates: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(classes, (C, d) unit class embeddings): every template's prompt embedded, averaged per class
        (core.scoring.class_embeddings), as zero-shot evaluation does; prompt features stay float32 there
        (the prompt cache holds float32), so they are not rounded here either."""
        if self.is_fusion:
            raise StratalignError(f"run {self.run_id} is a CoMM fusion model: it has no zero-shot classifier "
                                  "(CoMM is scored with linear probes)")
        classes, temps = self.class_prompts(class_names, templates)
        prompts = [t.format(c) for c in classes for t in temps]
        tower = self.towers["text"]
        enc = self.encoder("text")
        with self._lock, torch.inference_mode(), _autocast(self.device):
            x = enc.forward_layer(enc.preprocess(prompts), tower.layer, tower.pooling).float().cpu().numpy()
        z = self.encode_features(x, "text").reshape(len(classes), len(temps), -1)
        return classes, class_embeddings(z)

    def classify(self, images: Sequence[Any] | Any, class_names: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None) -> Classification:
        """Zero-shot labels of images among class names (default: the run's dataset's classes and templates)."""
        classes, emb = self.class_embeddings(class_names, templates)
        return classify_embeddings(self.encode_image(images), classes, emb, self.temperature)


def classify_embeddings(z_img: np.ndarray, classes: list[str], class_emb: np.ndarray,
                        temperature: float = DEFAULT_TAU) -> Classification:
    """Argmax cosine over classes (ties: the lower class index, as core.scoring ranks them), with the
    probabilities softmax(cosine / temperature)."""
    scores = z_img @ class_emb.T
    idx = np.argmax(scores, axis=1)
    logits = scores.astype(np.float64) / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return Classification(classes, [classes[i] for i in idx], idx, scores, probs.astype(np.float32), temperature)


def _out(z: np.ndarray, return_tensors: str) -> Any:
    if return_tensors == "np":
        return z
    if return_tensors == "pt":
        return torch.from_numpy(z)
    raise StratalignError(f"return_tensors must be 'np' (numpy) or 'pt' (torch), not {return_tensors!r}")


def _autocast(device: torch.device) -> Any:
    """Autocast as extraction uses it: bfloat16 (float16 without bf16 support) on CUDA; nothing on the CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
