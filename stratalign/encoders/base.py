"""The Encoder interface, weight hashing (hashing.py, re-exported here) and a thread-safe image transform.

An Encoder wraps one frozen model of one modality. The extraction pipeline calls `preprocess` in loader
threads (cheap, CPU only, no shared mutable state) and `forward_pooled` on the device thread: one forward
pass under `torch.inference_mode`, every layer pooled in float32, only the pooled (b, d_l) vectors
returned.

`metadata()` feeds the feature store's entry key, so it must be deterministic across runs and machines:
it holds the spec, the weights' sha256, the preprocessing and labels, never timings, library versions or
absolute install paths of packaged weights.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from stratalign.encoders.hashing import atomic_write_bytes, cache_dir, file_sha256, weights_sha256  # noqa: F401 - re-exported
from stratalign.errors import StratalignError, preview

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderInfo:
    """One row of `stratalign encoders`."""

    name: str
    modality: str
    n_layers: int
    dim: int | tuple[int, ...]
    description: str
    default_pooling: str = ""
    poolings: tuple[str, ...] = field(default_factory=tuple)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's state_dict: each tensor's name, dtype, shape and raw bytes in name order.

    The fallback content address when the weight files a model was loaded from are unknown: it always
    exists, and two models hash equal exactly when their parameters and buffers are bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for wrapping a library error into a one-line StratalignError."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_state_dict_file(path: str | os.PathLike,
                         wrapper_keys: Sequence[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, never unpickling code: `safetensors.torch.load_file` for .safetensors,
    else `torch.load(weights_only=True)` on the CPU. A dict wrapping the weights under one of
    `wrapper_keys` (tried in order) is unwrapped, and a DataParallel `module.` prefix is stripped."""
    path = Path(path)
    if not path.is_file():
        raise StratalignError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise StratalignError(f"cannot read safetensors checkpoint {path}: {first_line(e)}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError for pickled objects, RuntimeError for junk
            raise StratalignError(
                f"cannot load checkpoint {path} as plain tensors (torch.load weights_only=True: {first_line(e)}); "
                "save its state_dict alone or convert it to .safetensors"
            ) from None
    if isinstance(state, dict):
        for key in wrapper_keys:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StratalignError(f"checkpoint {path} holds no state_dict of tensors (looked under {list(wrapper_keys)})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state, strict=True)` with a one-line error naming the checkpoint."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        what = (f"missing {preview(missing, 3)}; unexpected {preview(unexpected, 3)}" if missing or unexpected
                else first_line(e))
        raise StratalignError(f"checkpoint {source} does not fit {type(model).__name__}: {what}") from None


@contextmanager
def torch_load_weights_only() -> Iterator[None]:
    """Force `weights_only=True` on every `torch.load` inside the block (third-party loaders such as
    open_clip's or timm's pretrained downloads), so no checkpoint can unpickle arbitrary objects."""
    real = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = safe_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")


def weight_files_in(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder: safetensors if any, else the other weight formats."""
    folder = Path(folder)
    st = sorted(folder.rglob("*.safetensors"))
    if st:
        return st
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageTransform:
    """PIL -> normalised CHW float32: resize the shorter side to `resize` (keeping the aspect ratio),
    centre-crop `crop` x `crop`, scale to [0, 1], subtract mean, divide by std. Pure function of its input,
    safe to call from several threads."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def describe(self) -> dict[str, Any]:
        return {"resize_shorter_side": self.resize, "center_crop": self.crop, "interpolation": self.interpolation,
                "rescale": "1/255", "mean": list(self.mean), "std": list(self.std), "channels": "RGB"}

    def _crop(self, image: Any) -> Any:
        im = image.convert("RGB")
        w, h = im.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.crop, round(w * scale)), max(self.crop, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample=_RESAMPLE[self.interpolation])
        left = int(round((nw - self.crop) / 2.0))
        top = int(round((nh - self.crop) / 2.0))
        return im.crop((left, top, left + self.crop, top + self.crop))

    def _normalise_into(self, im: Any, out: np.ndarray) -> None:
        """(x / 255 - mean) / std in float32, in that order, written straight into a CHW slot of the batch
        (no temporaries: the loader threads share the CPUs with the model)."""
        chw = np.asarray(im).transpose(2, 0, 1)  # a view of the HWC uint8 pixels
        np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)
        out -= np.asarray(self.mean, np.float32)[:, None, None]
        out /= np.asarray(self.std, np.float32)[:, None, None]

    def into(self, image: Any, out: np.ndarray) -> None:
        """One image into a (3, crop, crop) float32 slot, e.g. of a shared-memory batch (no torch call)."""
        self._normalise_into(self._crop(image), out)

    def one(self, image: Any) -> np.ndarray:
        out = np.empty((3, self.crop, self.crop), np.float32)
        self.into(image, out)
        return out

    def __call__(self, images: list) -> torch.Tensor:
        if not images:
            raise StratalignError("preprocess got an empty batch")
        batch = np.empty((len(images), 3, self.crop, self.crop), np.float32)
        for i, im in enumerate(images):
            self.into(im, batch[i])
        return torch.from_numpy(batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if v.device != device else v) for k, v in batch.items()}


class Encoder:
    """Base class: a frozen model of one modality that pools every layer of one forward pass.

    Subclasses set the attributes below and implement `preprocess` and `forward_pooled`."""

    spec: str
    modality: str  # "image" | "text"
    layer_names: list[str]
    dims: list[int]
    default_pooling: str
    poolings: tuple[str, ...]
    model: torch.nn.Module
    # Image encoders whose `preprocess(items)` is exactly {"pixel_values": image_transform(items)} set this:
    # extraction may then prepare their batches in loader processes without the encoder (image_loaders.py).
    image_transform: "ImageTransform | None" = None

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.forward_calls = 0

    # --- the interface -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_pooled(self, batch: dict[str, torch.Tensor], poolings: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Encoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # --- one layer only (AlignedModel) ---------------------------------------------------------------
    #: True when `forward_layer` stops the model after the layer asked for; False: it runs the full forward.
    truncates = False

    def forward_layer(self, batch: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
        """The pooled (b, d) float32 features of one layer, the same numbers `forward_pooled` gives for it.

        Encoders that can stop early (`truncates`) run their blocks only up to that layer; this default runs
        the full forward pass and keeps the one layer."""
        pooling = self.check_layer(layer, pooling)
        with torch.inference_mode():
            return self.forward_pooled(batch, [pooling])[pooling][layer]

    def check_layer(self, layer: int, pooling: str) -> str:
        """The pooling, checked; a layer index outside the encoder is a one-line error."""
        if not 0 <= int(layer) < self.n_layers:
            raise StratalignError(f"{self.spec} has layers 0..{self.n_layers - 1}, not {layer}")
        return self.check_poolings([pooling])[0]

    # --- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def frozen(model: torch.nn.Module) -> torch.nn.Module:
        """The model in eval mode with every parameter frozen: encoders are never trained."""
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def check_poolings(self, poolings: Sequence[str]) -> list[str]:
        poolings = list(dict.fromkeys(poolings))
        if not poolings:
            raise StratalignError(f"{self.spec}: ask for at least one pooling ({', '.join(self.poolings)})")
        bad = [p for p in poolings if p not in self.poolings]
        if bad:
            raise StratalignError(f"pooling {bad[0]!r} not supported by {self.spec}; supported: {', '.join(self.poolings)}")
        return poolings

    def base_metadata(self) -> dict[str, Any]:
        return {"spec": self.spec, "modality": self.modality, "model_class": type(self.model).__name__,
                "layer_names": list(self.layer_names), "dims": [int(d) for d in self.dims],
                "poolings": list(self.poolings), "default_pooling": self.default_pooling}

    def info(self, name: str | None = None, description: str = "") -> EncoderInfo:
        dims = tuple(self.dims)
        return EncoderInfo(name=name or self.spec, modality=self.modality, n_layers=self.n_layers,
                           dim=dims[0] if len(set(dims)) == 1 else dims, description=description,
                           default_pooling=self.default_pooling, poolings=tuple(self.poolings))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} {self.modality} layers={self.n_layers} device={self.device}>"


class LayerReached(Exception):
    """Raised by a hook to stop a forward pass once the layer asked for is computed (`HookRecorder.until`)."""


class HookRecorder:
    """Forward hooks that record module outputs (optionally the input of a first module) in call order.

    Used by encoders whose models do not return hidden states (open_clip, timm, EfficientNet). Inside
    `until(i)` the hook of recorded index i stops the forward pass (LayerReached) once it has recorded:
    the blocks after it never run."""

    def __init__(self, modules: Sequence[torch.nn.Module], input_of: torch.nn.Module | None = None) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * (len(modules) + (input_of is not None))
        self.stop: int | None = None
        self.handles = []
        offset = 0
        if input_of is not None:
            self.handles.append(input_of.register_forward_pre_hook(self._pre_hook(0), with_kwargs=True))
            offset = 1
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_hook(self._hook(i + offset)))

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            self.outputs[i] = args[0] if args else next(iter(kwargs.values()))
            if i == self.stop:
                raise LayerReached
        return hook

    def _hook(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, (tuple, list)) else output
            if i == self.stop:
                raise LayerReached
        return hook

    def run_until(self, index: int, forward: Any) -> list[torch.Tensor]:
        """Call `forward()` and stop it once recorded index `index` is computed; the recorded outputs
        0..index (a stop past the last recorded module runs the whole forward)."""
        self.stop = index
        try:
            forward()
        except LayerReached:
            pass
        finally:
            self.stop = None
        return self.take(index + 1)

    def take(self, n: int | None = None) -> list[torch.Tensor]:
        """The first n recorded outputs (all by default), then forget every recording."""
        n = len(self.outputs) if n is None else min(n, len(self.outputs))
        missing = [i for i, o in enumerate(self.outputs[:n]) if o is None]
        if missing:
            raise StratalignError(f"the forward pass did not reach layer(s) {missing}: hooks recorded nothing there")
        out = list(self.outputs[:n])  # type: ignore[arg-type]
        self.outputs = [None] * len(self.outputs)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
