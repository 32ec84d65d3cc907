"""Device choice shared by extraction and training."""

from __future__ import annotations

import torch

from stratalign.errors import StratalignError


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; a CUDA device without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StratalignError(f"device {device!r} requested but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise StratalignError(f"unknown device {device!r}: use auto, cpu or cuda[:n]") from None
