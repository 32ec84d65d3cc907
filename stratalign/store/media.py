"""Reading the raw items of a dataset row: image files (checked against their ingest hash) and captions."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath

import fsspec
from PIL import Image

from stratalign.errors import StratalignError


class BadItem(StratalignError):
    """An image that cannot be read or changed since ingest; carries the row for --skip-bad."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row

    def __reduce__(self) -> tuple:  # rebuilt with both arguments when a loader process raises it
        return BadItem, (self.row, str(self))


def read_bytes(path: str) -> bytes:
    """A file's bytes: a local path straight through `open` (fsspec.open costs ~0.1 ms of URL parsing a call,
    a third of loading a 72 px emoji), anything with a protocol (s3://, gs://, file://) through fsspec."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    with fsspec.open(path, "rb") as f:
        return f.read()


def load_image(path: str, expected_sha: str | None = None, *, row: int = -1, image_id: str = "?") -> Image.Image:
    """Decode one image to RGB; fail naming the image if it is missing, corrupt or changed since ingest."""
    try:
        data = read_bytes(path)
    except (OSError, ValueError) as exc:
        raise BadItem(row, f"image {image_id} ({path}) cannot be read: {type(exc).__name__}") from None
    if expected_sha is not None and hashlib.blake2b(data, digest_size=16).hexdigest() != expected_sha:
        raise BadItem(row, f"image {image_id} ({path}) changed since ingest; re-run `stratalign ingest --replace`")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "LA", "RGBA", "PA"):
                # Transparent pixels become white, as the images are shown (emoji, logos), not black.
                rgba = im.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                canvas.alpha_composite(rgba)
                return canvas.convert("RGB")
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadItem(row, f"image {image_id} ({path}) is corrupt: {type(exc).__name__}: {str(exc)[:60]}") from None


def load_image_or_blank(path: str, expected_sha: str | None, *, row: int, image_id: str,
                        skip_bad: bool) -> tuple[Image.Image, bool]:
    """`load_image`, or under skip_bad a white 32x32 stand-in for an unreadable image: (image, was it bad).
    Loader threads and loader processes both call this, so a skipped row has the same bytes either way."""
    try:
        return load_image(path, expected_sha, row=row, image_id=image_id), False
    except BadItem:
        if not skip_bad:
            raise
        return Image.new("RGB", (32, 32), (255, 255, 255)), True


def outside_roots(path: str, relpath: str, roots: list[str]) -> bool:
    """Is an image path of a dataset table outside the dataset's declared image roots? A path must be one of
    the roots joined with its relative path, and that relative path must stay inside (no '..', not absolute),
    unless the table named the file by its absolute path or URL (relpath == path) in a folder the roots declare
    ('abs:<folder>', recorded at ingest) or the roots allow any ('*': tables ingested before folders were
    recorded). A tar member (tar://<member>::<shard>) must be of a declared shard ('tar:<shard>')."""
    if path.startswith("tar://"):  # a member of a tar shard: tar://<member>::<shard>
        member, sep, shard = path.removeprefix("tar://").partition("::")
        return not (sep and f"tar:{shard}" in roots and ".." not in member.split("/"))
    if "://" in relpath or relpath.startswith("/"):
        if path != relpath or ".." in relpath.replace("\\", "/").split("/"):
            return True
        folder = posixpath.dirname(relpath)
        return not ("*" in roots or f"abs:{folder}" in roots)
    parts = relpath.replace("\\", "/").split("/")
    if ".." in parts:
        return True
    for root in roots:
        if root == "*":
            continue
        joined = f"{root.rstrip('/')}/{relpath}" if "://" in root else os.path.join(root, relpath)
        if path == joined or os.path.normpath(path) == os.path.normpath(joined):
            return False
    return True
