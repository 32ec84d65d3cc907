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
Blocks may run sequence-first (open_clip's `Transformer` without a `batch_first` attribute transposes to
(tokens, batch, dim) inside its forward) or batch-first (`CustomTransformer`, `batch_first=True`). The
layout is read from the recorded shapes of a 3-row probe (the attribute, or its absence meaning
sequence-first, only decides when the shapes cannot), and the recorded tensors are put batch-first.

Weights: a local file is loaded here (safetensors, or torch.load with weights_only=True) into a model
built without weights, with open_clip's own state-dict fixups; a pretrained tag is loaded by open_clip
with every torch.load forced to weights_only=True. `weights_sha256` is the file's sha256, or for a tag
(or random init) the sha256 of the loaded state_dict.

Tested in CI's extras environment (torch 2.14.1 + torchvision; tests/encoders/test_open_clip.py): PyPI torchvision
does not work beside the default environment's torch 2.13.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from stratalign.core.pooling import pool_layers
from stratalign.encoders.base import (
    Encoder,
    HookRecorder,
    first_line,
    load_state_dict_file,
    load_weights_into,
    state_dict_sha256,
    to_device,
    torch_load_weights_only,
    weights_sha256,
)
from stratalign.errors import StratalignError

PROBE_ROWS = 3  # a batch size no sequence length equals, so the probe tells batch-first from sequence-first


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
                self._declared_batch_first = getattr(visual.transformer, "batch_first", None)
                self.recorder = HookRecorder(blocks, input_of=blocks[0])
                self.poolings, self.default_pooling = ("cls", "mean"), "cls"
                self.n_prefix = 1
                self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(blocks) + 1)]
            elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
                blocks = [getattr(visual, f"layer{i}") for i in range(1, 5)]
                self.kind, self._declared_batch_first, self.n_prefix = "cnn", True, 0
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
            self._declared_batch_first = getattr(transformer, "batch_first", None)
            self.recorder = HookRecorder(blocks, input_of=blocks[0])
            self.poolings, self.default_pooling = ("mean", "eos"), "mean"
            self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(blocks) + 1)]
        self.batch_first = True
        self._weights_sha: str | None = None
        self.to(device)
        self._probe()

    def to(self, device: str | torch.device) -> "OpenCLIPEncoder":
        self.device = torch.device(device)
        self.full.to(self.device)
        return self

    def _probe(self) -> None:
        from PIL import Image

        if self.modality == "image":
            items: list = [Image.new("RGB", (256, 256), (40 * i, 128, 128)) for i in range(PROBE_ROWS)]
        else:
            items = ["a photo", "a photo of a cat", "a dog"][:PROBE_ROWS]
        states = self._states(self.preprocess(items), raw=True)
        if len(states) != len(self.layer_names):
            raise StratalignError(f"{self.spec}: recorded {len(states)} layers, expected {len(self.layer_names)}")
        if self.kind != "cnn":
            self.batch_first = self._layout(states)
            states = self._batch_first(states)
        self.dims = [int(s.shape[1] if self.kind == "cnn" else s.shape[-1]) for s in states]
        self.forward_calls = 0

    def _layout(self, states: list[torch.Tensor]) -> bool:
        """True when the blocks ran batch-first: read from the probe's shapes, else from the transformer's
        `batch_first` attribute, else sequence-first (open_clip's `Transformer` has no such attribute)."""
        shapes = {tuple(s.shape[:2]) for s in states}
        if any(s.ndim != 3 for s in states) or len(shapes) != 1:
            raise StratalignError(f"{self.spec}: transformer blocks recorded tensors of shapes "
                                  f"{[tuple(s.shape) for s in states]}, not one (batch, tokens, dim) layout")
        d0, d1 = shapes.pop()
        if d0 == PROBE_ROWS and d1 != PROBE_ROWS:
            return True
        if d1 == PROBE_ROWS and d0 != PROBE_ROWS:
            return False
        if d0 != PROBE_ROWS and d1 != PROBE_ROWS:
            raise StratalignError(f"{self.spec}: a {PROBE_ROWS}-row probe recorded block outputs of shape "
                                  f"({d0}, {d1}, ...): neither axis is the batch")
        return bool(self._declared_batch_first) if self._declared_batch_first is not None else False

    def _batch_first(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return states if self.batch_first else [s.transpose(0, 1) for s in states]

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        if not items:
            raise StratalignError("preprocess got an empty batch")
        if self.modality == "image":
            return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in items])}
        tokens = self.tokenizer([str(t) for t in items])
        return {"input_ids": tokens, "attention_mask": (tokens != 0).long()}

    def _states(self, batch: dict[str, torch.Tensor], raw: bool = False) -> list[torch.Tensor]:
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            self.forward_calls += 1
            if self.modality == "image":
                self.full.encode_image(batch["pixel_values"])
            else:
                self.full.encode_text(batch["input_ids"])
        states = self.recorder.take()
        return states if raw or self.kind == "cnn" else self._batch_first(states)

    truncates = True

    def forward_layer(self, batch: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
        """Layer `layer` pooled; the hook that records it stops the tower (later blocks, final norm unused)."""
        pooling = self.check_layer(layer, pooling)
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            self.forward_calls += 1
            if self.modality == "image":
                states = self.recorder.run_until(layer, lambda: self.full.encode_image(batch["pixel_values"]))
            else:
                states = self.recorder.run_until(layer, lambda: self.full.encode_text(batch["input_ids"]))
            state = states[layer] if self.kind == "cnn" else self._batch_first(states[layer:])[0]
            mask = batch.get("attention_mask")
            return pool_layers([state], [pooling], kind=self.kind, attention_mask=mask, n_prefix=self.n_prefix)[pooling][0]

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
        if self._weights_sha is None:  # a file's hash is cached on disk; a state_dict's once per load
            if self.weights and Path(self.weights).is_file():
                self._weights_sha = weights_sha256([self.weights])
            else:
                self._weights_sha = state_dict_sha256(self.full)
        sha = self._weights_sha
        if self.modality == "image":
            pre: dict[str, Any] = {"transform": repr(self.transform)}
        else:
            pre = {"tokenizer": type(self.tokenizer).__name__,
                   "context_length": int(getattr(self.tokenizer, "context_length", 77))}
        meta.update({"weights_sha256": sha, "preprocessing": pre, "source": f"open_clip {self.arch} {self.weights}",
                     "library": "open_clip"})
        return meta


def load_open_clip_file(model: torch.nn.Module, path: str) -> None:
    """Load a local open_clip checkpoint without unpickling: our safe loader, then the fixups open_clip's
    own `load_checkpoint` applies (third-party layouts, old text layout, logit shapes, position ids,
    position-embedding resizes), then a strict load_state_dict. big_vision .npz goes to open_clip's numpy
    loader (np.load without pickles)."""
    import open_clip

    if Path(path).suffix in (".npz", ".npy"):
        from open_clip.convert import load_big_vision_weights

        load_big_vision_weights(model, path)
        return
    state = load_state_dict_file(path)
    try:
        from open_clip.convert import convert_state_dict

        state = convert_state_dict(model, state)
    except ImportError:  # older open_clip: no third-party conversions
        pass
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if name in state and isinstance(param, torch.Tensor) and param.ndim != state[name].ndim:
            state[name] = state[name].reshape(param.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and position_ids not in model.state_dict():
        del state[position_ids]
    for fix in ("resize_pos_embed", "resize_text_pos_embed"):
        fn = getattr(open_clip.model, fix, None)
        if fn is not None:
            fn(state, model)
    load_weights_into(model, state, path)


def load_open_clip(spec: str, device: str = "cpu") -> Encoder:
    try:
        import open_clip
    except ImportError:
        raise StratalignError("open_clip encoders need the 'clip' extra: pip install 'stratalign[clip]'") from None
    arch, weights, tower = parse_open_clip_spec(spec)
    local = bool(weights) and Path(str(weights)).is_file()
    try:
        if local:  # build without weights, then load the file ourselves (no pickle)
            try:
                model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None, pretrained_hf=False)
            except TypeError:  # an open_clip without pretrained_hf
                model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
        else:  # a pretrained tag (or none): open_clip downloads it; every torch.load is weights_only
            with torch_load_weights_only():
                model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=weights)
    except StratalignError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown arch, unknown tag, no network, refused pickle
        raise StratalignError(f"open_clip could not build {arch!r} with weights {weights!r}: {first_line(e)}") from e
    if local:
        load_open_clip_file(model, str(weights))
    tokenizer = open_clip.get_tokenizer(arch) if tower == "text" else None
    canonical = f"open_clip:{arch}" + (f":{weights}" if weights else "") + f":{tower}"
    return OpenCLIPEncoder(canonical, model, tower, transform=transform, tokenizer=tokenizer, weights=weights,
                           arch=arch, device=device)
