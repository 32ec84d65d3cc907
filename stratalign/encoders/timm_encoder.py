"""`timm:<model name>[:<checkpoint file>]` (optional extra `timm`, imported lazily).

Without a checkpoint file, timm's pretrained weights are requested (needs the hub, so not offline; every
torch.load timm makes is forced to weights_only=True). A checkpoint file is never handed to timm: the
model is built without weights and the file loaded here (safetensors, or torch.load weights_only=True;
an EMA state preferred like timm's load_checkpoint) with a strict load_state_dict. `weights_sha256` is the
checkpoint's sha256, else the sha256 of the loaded state_dict.
Layers come from forward hooks during one `forward_features` pass:
- ViT family (`model.blocks` and `model.num_prefix_tokens`): layer 0 is the input of the first block
  (patch embeddings + prefix tokens + positions, after `norm_pre`), layer i the output of block i; the
  final `model.norm` comes after and is not a layer. `cls` = token 0 when the model has a class token;
  `mean` = mean over patch tokens, all `num_prefix_tokens` (class, register, distillation) excluded.
- CNNs: the modules listed in `model.feature_info` (stem and stages), feature maps `avg` pooled; NHWC
  outputs are detected from the channel counts and pooled the same.
Preprocessing follows timm's resolved data config: resize the shorter side to input_size / crop_pct,
centre crop, the model's mean/std (timm's own transforms need torchvision, hence a PIL version here).

Tested in CI's extras environment (torch 2.14.1 + torchvision; tests/encoders/test_timm_encoder.py): PyPI
torchvision does not work beside the default environment's torch 2.13.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from stratalign.core.pooling import pool_layers
from stratalign.encoders.base import (
    Encoder,
    HookRecorder,
    ImageTransform,
    first_line,
    load_state_dict_file,
    load_weights_into,
    state_dict_sha256,
    to_device,
    torch_load_weights_only,
    weights_sha256,
)
from stratalign.errors import StratalignError

TIMM_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_checkpoint order


class TimmEncoder(Encoder):
    modality = "image"

    def __init__(self, spec: str, model: torch.nn.Module, transform: ImageTransform, *, name: str,
                 checkpoint: str | None, device: str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.model = self.frozen(model)
        self.image_transform = transform
        self.name = name
        self.checkpoint = checkpoint
        self._weights_sha: str | None = None
        blocks = getattr(model, "blocks", None)
        self.channels_last: list[bool] = []
        if blocks is not None and hasattr(model, "num_prefix_tokens") and len(blocks) > 0:
            blocks = list(blocks)
            self.kind = "vision"
            self.n_prefix = int(model.num_prefix_tokens)
            self.recorder = HookRecorder(blocks, input_of=blocks[0])
            self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(blocks) + 1)]
            has_cls = getattr(model, "cls_token", None) is not None and self.n_prefix >= 1
            self.poolings = ("cls", "mean") if has_cls else ("mean",)
            self.default_pooling = "cls" if has_cls else "mean"
        else:
            info = getattr(model, "feature_info", None)
            if not info:
                raise StratalignError(f"{spec}: timm model {type(model).__name__} has neither ViT blocks nor "
                                      "feature_info; cannot find its layers")
            entries = [dict(e) for e in (info.info if hasattr(info, "info") else info)]
            modules = dict(model.named_modules())
            names = [e["module"] for e in entries if e.get("module") in modules]
            if not names:
                raise StratalignError(f"{spec}: none of the feature_info modules were found in the model")
            self.kind, self.n_prefix = "cnn", 0
            self.recorder = HookRecorder([modules[n] for n in names])
            self.layer_names = names
            self._channels = [int(e.get("num_chs", 0)) for e in entries if e.get("module") in modules]
            self.poolings, self.default_pooling = ("avg",), "avg"
        self.to(device)
        self._probe()

    def _probe(self) -> None:
        from PIL import Image

        states = self._states(self.preprocess([Image.new("RGB", (256, 256), (128, 128, 128))]), raw=True)
        if self.kind == "cnn":
            self.channels_last = [s.ndim == 4 and s.shape[1] != c and s.shape[-1] == c
                                  for s, c in zip(states, self._channels)]
            states = self._fix_layout(states)
            if any(s.ndim != 4 for s in states):
                raise StratalignError(f"{self.spec}: a feature_info module does not output a feature map")
            self.dims = [int(s.shape[1]) for s in states]
        else:
            if any(s.ndim != 3 for s in states):
                raise StratalignError(f"{self.spec}: ViT blocks did not output (batch, tokens, dim) tensors")
            self.dims = [int(s.shape[-1]) for s in states]
        self.forward_calls = 0

    def _fix_layout(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [s.permute(0, 3, 1, 2) if cl else s for s, cl in zip(states, self.channels_last)]

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_transform(items)}

    def _states(self, batch: dict[str, torch.Tensor], raw: bool = False) -> list[torch.Tensor]:
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            self.forward_calls += 1
            self.model.forward_features(batch["pixel_values"])
        states = self.recorder.take()
        return states if raw or self.kind != "cnn" else self._fix_layout(states)

    def forward_pooled(self, batch: dict[str, torch.Tensor], poolings: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        poolings = self.check_poolings(poolings)
        with torch.inference_mode():
            return pool_layers(self._states(batch), poolings, kind=self.kind, n_prefix=self.n_prefix)

    truncates = True

    def forward_layer(self, batch: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
        """Layer `layer` pooled; the hook that records it stops `forward_features` there."""
        pooling = self.check_layer(layer, pooling)
        pixels = to_device(batch, self.device)["pixel_values"]
        with torch.inference_mode():
            self.forward_calls += 1
            states = self.recorder.run_until(layer, lambda: self.model.forward_features(pixels))
            state = self._fix_layout(states)[layer] if self.kind == "cnn" else states[layer]
            return pool_layers([state], [pooling], kind=self.kind, n_prefix=self.n_prefix)[pooling][0]

    def metadata(self) -> dict[str, Any]:
        meta = self.base_metadata()
        meta["model_class"] = f"timm {type(self.model).__name__}"
        if self._weights_sha is None:  # a file's hash is cached on disk; a state_dict's once per load
            self._weights_sha = (weights_sha256([self.checkpoint]) if self.checkpoint
                                 else state_dict_sha256(self.model))
        meta.update({"weights_sha256": self._weights_sha, "preprocessing": self.image_transform.describe(),
                     "source": f"timm {self.name}" + (f" {self.checkpoint}" if self.checkpoint else " (pretrained)"),
                     "library": "timm", "prefix_tokens": self.n_prefix if self.kind == "vision" else None})
        return meta


def load_timm_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint file into a timm model the way timm's load_checkpoint would, but never unpickling:
    .npz/.npy (JAX ViT weights) through the model's own numpy loader, anything else through
    `load_state_dict_file` (EMA weights preferred, `module.` stripped) and a strict load_state_dict."""
    if Path(path).suffix.lower() in (".npz", ".npy"):
        if not hasattr(model, "load_pretrained"):
            raise StratalignError(f"timm checkpoint {path}: {type(model).__name__} cannot load numpy weights")
        model.load_pretrained(path)
        return
    load_weights_into(model, load_state_dict_file(path, TIMM_WRAPPER_KEYS), path)


def load_timm(spec: str, device: str = "cpu") -> Encoder:
    try:
        import timm
    except ImportError:
        raise StratalignError("timm encoders need the 'timm' extra: pip install 'stratalign[timm]'") from None
    body = spec[len("timm:"):]
    name, _, checkpoint = body.partition(":")
    if not name:
        raise StratalignError(f"encoder spec {spec!r} names no model: use timm:<name>[:<checkpoint file>]")
    if checkpoint and not Path(checkpoint).is_file():
        raise StratalignError(f"timm checkpoint {checkpoint!r} is not a file")
    try:
        if checkpoint:
            model = timm.create_model(name, pretrained=False)
        else:
            with torch_load_weights_only():
                model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - unknown model, no network, refused pickle
        raise StratalignError(f"timm could not create {name!r}: {first_line(e)}") from e
    if checkpoint:
        load_timm_checkpoint(model, checkpoint)
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interp = str(cfg.get("interpolation", "bicubic"))
    transform = ImageTransform(resize=int(math.floor(size / crop_pct)), crop=size,
                               mean=tuple(float(x) for x in cfg["mean"]), std=tuple(float(x) for x in cfg["std"]),
                               interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic")
    canonical = f"timm:{name}" + (f":{checkpoint}" if checkpoint else "")
    return TimmEncoder(canonical, model, transform, name=name, checkpoint=checkpoint or None, device=device)
