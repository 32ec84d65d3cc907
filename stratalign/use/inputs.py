"""What AlignedModel accepts as images and texts, made into what its encoders take: PIL RGB images (from
paths, PIL images, arrays or uploaded bytes; transparent pixels on white, as store.media reads dataset files) and
non-empty strings. Uploaded bytes are decoded under a pixel limit (a decompression bomb is refused in one line).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stratalign.errors import StratalignError

MAX_PIXELS = 40_000_000  # an uploaded image larger than this (e.g. 8000 x 5000) is refused before decoding


def texts_of(texts: Sequence[str] | str) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise StratalignError("no texts to encode")
    for i, t in enumerate(items):
        if not isinstance(t, str) or not t.strip():
            raise StratalignError(f"text {i} is {'empty' if isinstance(t, str) else type(t).__name__}: give non-empty strings")
    return items


def images_of(images: Sequence[Any] | Any) -> list[Any]:
    """PIL RGB images from paths, PIL images or arrays (transparent pixels on white, as extraction reads them)."""
    from PIL import Image

    items = [images] if isinstance(images, (str, bytes, Path, Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4) else list(images)
    if not items:
        raise StratalignError("no images to encode")
    return [image_of(x, i) for i, x in enumerate(items)]


def image_of(x: Any, i: int) -> Any:
    from PIL import Image

    from stratalign.store.media import load_image

    if isinstance(x, (str, Path)):
        return load_image(str(x), row=i, image_id=str(i))
    if isinstance(x, (bytes, bytearray)):
        return image_from_bytes(bytes(x), f"image {i}")
    if isinstance(x, np.ndarray):
        arr = x
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0 or arr.min() < 0 or arr.max() > 1:
                raise StratalignError(f"image {i}: an array must be uint8 or float in [0, 1], got {arr.dtype}")
            arr = np.round(arr * 255).astype(np.uint8)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise StratalignError(f"image {i}: an array must be (h, w), (h, w, 3) or (h, w, 4), got {arr.shape}")
        x = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if not isinstance(x, Image.Image):
        raise StratalignError(f"image {i} is a {type(x).__name__}: give a path, a PIL image or an array")
    if x.mode in ("P", "LA", "RGBA", "PA"):  # transparent pixels on white, as store.media.load_image reads files
        rgba = x.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return x.convert("RGB")


def image_from_bytes(data: bytes, what: str = "upload", max_pixels: int = MAX_PIXELS) -> Any:
    """A PIL RGB image from encoded bytes (PNG, JPEG, ...); unreadable data or more than `max_pixels` pixels is
    a one-line error (checked from the header, before the pixels are decoded)."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        raise StratalignError(f"{what} is not an image PIL can read ({type(exc).__name__})") from None
    if w * h > max_pixels:
        raise StratalignError(f"{what} is {w}x{h} pixels, more than the {max_pixels:,} allowed")
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001
        raise StratalignError(f"{what} is a corrupt image ({type(exc).__name__})") from None
    return image_of(im, 0)
