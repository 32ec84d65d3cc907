"""Weight-file hashing with a small cache, and the stratalign cache folder: no torch, so that extraction can tell
whether an encoder's files changed without loading it (encoders.identity).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from stratalign.errors import StratalignError

__all__ = ["atomic_write_bytes", "cache_dir", "file_sha256", "weights_sha256"]


def cache_dir() -> Path:
    """$STRATALIGN_CACHE, else ~/.cache/stratalign (created on demand)."""
    root = os.environ.get("STRATALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stratalign")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_HASH_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached on (absolute path, size, mtime_ns) in <cache>/sha256_cache.json."""
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = cache_dir() / "sha256_cache.json"
    with _HASH_LOCK:
        try:
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, ValueError):
            cache = {}
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            return str(hit["sha256"])
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        try:  # re-read: another process may have added entries meanwhile; losing a race only costs a rehash
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, ValueError):
            cache = {}
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:
            atomic_write_bytes(cache_file, json.dumps(cache, indent=0, sort_keys=True).encode())
        except OSError:
            pass
        return digest


def weights_sha256(files: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """One hash for a set of weight files: the file's own sha256 for one file, otherwise the sha256 of
    the sorted "relative name  sha256" lines."""
    files = sorted(Path(f) for f in files)
    if not files:
        raise StratalignError("no weight files to hash")
    if len(files) == 1:
        return file_sha256(files[0])
    lines = []
    for f in files:
        name = os.path.relpath(f, root) if root is not None else f.name
        lines.append(f"{name}  {file_sha256(f)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
