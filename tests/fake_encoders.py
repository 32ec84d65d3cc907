"""Tiny deterministic encoders that follow the Encoder interface, for testing the store and extraction
mechanics without any model weights. Real encoders are tested in tests/encoders/test_base_encoders.py."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from stratalign.encoders.base import ImageTransform

TINY_TRANSFORM = ImageTransform(resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class TinyImageEncoder:
    """3 'layers': an 8x8 grey thumbnail through fixed random linear maps with tanh. Its preprocessing is
    a plain ImageTransform, so on Linux CPU extraction prepares its batches in loader processes."""

    modality = "image"
    default_pooling = "avg"
    poolings = ("avg", "max")
    image_transform = TINY_TRANSFORM

    def __init__(self, spec: str = "tiny-image", delay_s: float = 0.0, scale: float = 1.0) -> None:
        self.spec = spec
        self.delay_s = delay_s
        g = torch.Generator().manual_seed(0)
        self.w = [torch.randn(64, 16, generator=g) * scale, torch.randn(16, 12, generator=g),
                  torch.randn(12, 8, generator=g)]
        self.layer_names = ["l0", "l1", "l2"]
        self.dims = [16, 12, 8]
        self.forward_calls = 0

    def metadata(self) -> dict:
        return {"spec": self.spec, "weights_sha256": "tiny", "preprocessing": "grey 8x8"}

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_transform(items)}

    def forward_pooled(self, batch, poolings):
        self.forward_calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        pixels = batch["pixel_values"]
        h = pixels.mean(1).reshape(len(pixels), 64)
        layers = []
        for w in self.w:
            h = torch.tanh(h @ w) if w.shape[0] != 64 else h @ w
            layers.append(h)
        out = {}
        for p in poolings:
            out[p] = [x.float() if p == "avg" else x.float().abs() for x in layers]
        return out


class TinyTextEncoder:
    """2 'layers' from character counts of the caption."""

    modality = "text"
    default_pooling = "mean"
    poolings = ("mean", "cls")

    def __init__(self, spec: str = "tiny-text") -> None:
        self.spec = spec
        g = torch.Generator().manual_seed(1)
        self.w = [torch.randn(27, 10, generator=g), torch.randn(10, 6, generator=g)]
        self.layer_names = ["t0", "t1"]
        self.dims = [10, 6]

    def metadata(self) -> dict:
        return {"spec": self.spec, "weights_sha256": "tiny", "preprocessing": "char counts"}

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        x = np.zeros((len(items), 27), np.float32)
        for i, t in enumerate(items):
            for ch in t.lower():
                x[i, ord(ch) - 97 if "a" <= ch <= "z" else 26] += 1
        return {"counts": torch.from_numpy(x)}

    def forward_pooled(self, batch, poolings):
        h1 = batch["counts"] @ self.w[0]
        h2 = torch.tanh(h1) @ self.w[1]
        return {p: [h1, h2] for p in poolings}


def load_tiny(spec: str, device: str = "cpu"):
    if spec.startswith("tiny-image"):
        return TinyImageEncoder(spec, delay_s=float(os.environ.get("TINY_DELAY_S", "0")))
    if spec.startswith("tiny-text"):
        return TinyTextEncoder(spec)
    raise ValueError(spec)


class PidWeightsImageEncoder(TinyImageEncoder):
    """Reports a weights hash that differs per process, like a node with another checkpoint."""

    def metadata(self) -> dict:
        return {**super().metadata(), "weights_sha256": f"pid-{os.getpid()}"}


class FailingImageEncoder(TinyImageEncoder):
    """Fails in the forward pass: with a StratalignError, or any other error when `plain`."""

    def __init__(self, spec: str, plain: bool) -> None:
        super().__init__(spec)
        self.plain = plain

    def forward_pooled(self, batch, poolings):
        if self.plain:
            raise ValueError("weights went missing\nsecond line of detail")
        from stratalign.errors import StratalignError

        raise StratalignError("tiny-image-fails cannot read row 3 of toy")


def load_odd(spec: str, device: str = "cpu"):
    """Loader for the Ray error tests: per-process weights, encoders that fail, or (in a Ray actor only)
    a worker whose claims never succeed, as on a store it cannot write to."""
    if spec == "tiny-image-noclaim":
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            from stratalign.store import claims

            claims.try_claim = lambda *args, **kwargs: False
        return TinyImageEncoder(spec)
    if spec == "tiny-image-pid":
        return PidWeightsImageEncoder(spec)
    if spec in ("tiny-image-fails", "tiny-image-crashes"):
        return FailingImageEncoder(spec, plain=spec == "tiny-image-crashes")
    return load_tiny(spec, device)
