"""Frozen encoders that pool every layer of one forward pass (docs/method.md §§ 0 and 1).

    load_encoder(spec, device="cpu") -> Encoder
    known_encoders() -> list[EncoderInfo]

Spec strings:
- a named offline encoder: `minilm-l6`, `efficientnet-lite0`, `dinov2-s` (see named.py);
- `hf:<model id or local folder>[:image|:text]`: a transformers model (hf.py);
- `open_clip:<arch>[:<weights file or tag>][:image|:text]`: extra `clip` (open_clip.py);
- `timm:<name>[:<checkpoint file>]`: extra `timm` (timm_encoder.py).

Importing this package loads no model, sets nothing global and imports no torch (`Encoder` and `EncoderInfo`
are loaded from base.py on first use), so that `encoders.identity` can answer without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stratalign.encoders.hashing import cache_dir, file_sha256
from stratalign.errors import StratalignError

if TYPE_CHECKING:
    from stratalign.encoders.base import Encoder, EncoderInfo


def __getattr__(name: str) -> Any:
    if name in ("Encoder", "EncoderInfo"):
        from stratalign.encoders import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

PREFIXES = ("hf:", "open_clip:", "timm:")


def known_encoders() -> list[EncoderInfo]:
    """The named encoders (the prefixed families hf:, open_clip:, timm: take any model)."""
    from stratalign.encoders.named import NAMED

    return [info for _, info in NAMED.values()]


def load_encoder(spec: str, device: str = "cpu") -> Encoder:
    """Load the encoder a spec string names, on `device`, in eval mode with gradients off."""
    from stratalign.encoders.named import NAMED

    spec = str(spec).strip()
    if spec in NAMED:
        return NAMED[spec][0](device)
    if spec.startswith("hf:"):
        from stratalign.encoders.hf import load_hf

        return load_hf(spec, device)
    if spec.startswith("open_clip:"):
        from stratalign.encoders.open_clip import load_open_clip

        return load_open_clip(spec, device)
    if spec.startswith("timm:"):
        from stratalign.encoders.timm_encoder import load_timm

        return load_timm(spec, device)
    raise StratalignError(f"unknown encoder {spec!r}; known encoders: {', '.join(NAMED)}; or hf:<model id or "
                          "folder>[:image|:text], open_clip:<arch>[:<weights>][:image|:text], timm:<name>[:<checkpoint>]")


__all__ = ["Encoder", "EncoderInfo", "StratalignError", "cache_dir", "file_sha256", "known_encoders", "load_encoder"]
