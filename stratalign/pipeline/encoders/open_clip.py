"""`open_clip:<arch>[:<weights file or pretrained tag>][:image|:text]` (extra `clip`, imported lazily).

open_clip models do not return hidden states, so forward hooks record them:
- vision ViT (`model.visual` is open_clip's VisionTransformer): layer 0 is the input of the first
  residual block (patch embeddings + class token + positions, after `ln_pre`, like HF CLIP's
  hidden_states[0]); layer i the output of block i; `ln_post` and the projection come after and are not
  layers. `cls` = token 0, `mean` = mean over the patch tokens (the class token excluded).
- vision ModifiedResNet (RN50 ...): the outputs of layer1..layer4, `avg` pooled.
- text (`model.transformer` with `token_embedding`, or `model.text` as a TextTransformer): layer 0 is the
  input of the first block (token + position embeddings), layer i the output of block i, before
  `ln_final`. Padding is token id 0 in open_clip's tokenizers, so the mask is tokens != 0. Poolings
  `mean` (mask-weighted, default) and `eos` (last real token, the end-of-text token CLIP projects); no
  `cls`, since token 0 of a causal text transformer does not depend on the text.
Blocks may run sequence-first (older open_clip); the recorded tensors are put batch-first.

Not tested in CI: PyPI torchvision (needed by open_clip) does not install beside torch 2.13.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from stratalign.errors import StratalignError
from stratalign.pipeline.encoders.base import Encoder, HookRecorder, to_device, weights_sha256
from stratalign.pipeline.pooling import pool_layers


def parse_open_clip_spec(spec: str) -> tuple[str, str | None, str]:
    body = spec[len("open_clip:"):]
    tower = "image"
    for t in ("image", "text"):
        if body.endswith(":" + t):
            body, tower = body[: -len(t) - 1], t
    arch, _, weights = body.partition(":")
    if not arch:
        raise StratalignError(f"encoder spec {spec!r} names no architecture: use open_clip:<arch>[:<weights>][:image|text]")
    return arch, (weights or None), tower


class OpenCLIPEncoder(Encoder):
    def __init__(self, spec: str, model: Any, tower: str, *, transform: Any, tokenizer: Any, weights: str | None,
                 arch: str, device: str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.full = self.frozen(model)
        self.modality = tower
        self.transform = transform
        self.tokenizer = tokenizer
        self.weights = weights
        self.arch = arch
        self.model = self.full.visual if tower == "image" else self.full
        if tower == "image":
            visual = self.full.visual
            if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
                blocks = list(visual.transformer.resblocks)
                self.kind = "vision"
                self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
                self.recorder = HookRecorder(blocks, input_of=blocks[0])
                self.poolings, self.default_pooling = ("cls", "mean"), "cls"
                self.n_prefix = 1
                self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(blocks) + 1)]
            elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
                blocks = [getattr(visual, f"layer{i}") for i in range(1, 5)]
                self.kind, self.batch_first, self.n_prefix = "cnn", True, 0
                self.recorder = HookRecorder(blocks)
                self.poolings, self.default_pooling = ("avg",), "avg"
                self.layer_names = [f"layer{i}" for i in range(1, 5)]
            else:
                raise StratalignError(f"{spec}: unsupported open_clip vision tower {type(visual).__name__}")
        else:
            text = getattr(self.full, "text", None)
            holder = text if text is not None and hasattr(text, "transformer") else self.full
            transformer = getattr(holder, "transformer", None)
            if transformer is None or not hasattr(transformer, "resblocks"):
                raise StratalignError(f"{spec}: unsupported open_clip text tower "
                                      f"{type(text or self.full).__name__} (no transformer.resblocks)")
            blocks = list(transformer.resblocks)
            self.kind, self.n_prefix = "text", 0
            self.batch_first = bool(getattr(transformer, "batch_first", True))
            self.recorder = HookRecorder(blocks, input_of=blocks[0])
            self.poolings, self.default_pooling = ("mean", "eos"), "mean"
            self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(blocks) + 1)]
        self.to(device)
        self._probe()

    def to(self, device: str | torch.device) -> "OpenCLIPEncoder":
        self.device = torch.device(device)
        self.full.to(self.device)
        return self

    def _probe(self) -> None:
        from PIL import Image

        item = Image.new("RGB", (256, 256), (128, 128, 128)) if self.modality == "image" else "a photo"
        states = self._states(self.preprocess([item]))
        if len(states) != len(self.layer_names):
            raise StratalignError(f"{self.spec}: recorded {len(states)} layers, expected {len(self.layer_names)}")
        self.dims = [int(s.shape[1] if self.kind == "cnn" else s.shape[-1]) for s in states]
        self.forward_calls = 0

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        if not items:
            raise StratalignError("preprocess got an empty batch")
        if self.modality == "image":
            return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in items])}
        tokens = self.tokenizer([str(t) for t in items])
        return {"input_ids": tokens, "attention_mask": (tokens != 0).long()}

    def _states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            self.forward_calls += 1
            if self.modality == "image":
                self.full.encode_image(batch["pixel_values"])
            else:
                self.full.encode_text(batch["input_ids"])
        states = self.recorder.take()
        if self.kind != "cnn" and not self.batch_first:
            states = [s.transpose(0, 1) for s in states]
        return states

    def forward_pooled(self, batch: dict[str, torch.Tensor], poolings: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        poolings = self.check_poolings(poolings)
        with torch.inference_mode():
            states = self._states(batch)
            mask = batch.get("attention_mask")
            if mask is not None:
                mask = mask.to(self.device)
            return pool_layers(states, poolings, kind=self.kind, attention_mask=mask, n_prefix=self.n_prefix)

    def metadata(self) -> dict[str, Any]:
        meta = self.base_metadata()
        meta["model_class"] = f"open_clip {type(self.full).__name__}"
        if self.weights and Path(self.weights).is_file():
            sha = weights_sha256([self.weights])
        else:
            sha = f"open_clip-pretrained:{self.arch}:{self.weights}" if self.weights else "random-init"
        if self.modality == "image":
            pre: dict[str, Any] = {"transform": repr(self.transform)}
        else:
            pre = {"tokenizer": type(self.tokenizer).__name__,
                   "context_length": int(getattr(self.tokenizer, "context_length", 77))}
        meta.update({"weights_sha256": sha, "preprocessing": pre, "source": f"open_clip {self.arch} {self.weights}",
                     "library": "open_clip"})
        return meta


def load_open_clip(spec: str, device: str = "cpu") -> Encoder:
    try:
        import open_clip
    except ImportError:
        raise StratalignError("open_clip encoders need the 'clip' extra: pip install 'stratalign[clip]'") from None
    arch, weights, tower = parse_open_clip_spec(spec)
    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=weights)
    except Exception as e:  # noqa: BLE001 - unknown arch, missing file, no network
        raise StratalignError(f"open_clip could not build {arch!r} with weights {weights!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(arch) if tower == "text" else None
    canonical = f"open_clip:{arch}" + (f":{weights}" if weights else "") + f":{tower}"
    return OpenCLIPEncoder(canonical, model, tower, transform=transform, tokenizer=tokenizer, weights=weights,
                           arch=arch, device=device)
