"""Where a store lives: a local path or any fsspec URL, and safe keys inside it."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import fsspec

from stratalign.errors import StratalignError
from stratalign.store.containment import escape

DEFAULT_STORE = "./stratalign-store"
STORE_ENV = "STRATALIGN_STORE"

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def default_store_url() -> str:
    """The store named by $STRATALIGN_STORE, else ./stratalign-store."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def validate_key(key: str, what: str = "key") -> str:
    """Reject anything that could escape its folder: only `[A-Za-z0-9._+=-]`, no `..`, no slashes."""
    if not isinstance(key, str) or not _KEY_PART.match(key) or ".." in key:
        raise StratalignError(
            f"invalid {what} {key!r}: use letters, digits, '.', '_', '+', '=', '-' (no '/', no '..')"
        )
    return key


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path inside it; all store I/O other than Zarr goes through here."""

    url: str
    fs: Any
    root: str

    @classmethod
    def from_url(cls, url: str) -> "Location":
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:  # an unknown protocol, or its library not installed
            raise StratalignError(f"cannot open store {url!r}: {exc}; use a local path or an fsspec URL "
                                  "(s3://bucket/path, gs://..., memory://...)") from None
        root = root.rstrip("/") or "/"
        return cls(url=url, fs=fs, root=root)

    @functools.cached_property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = protocol if isinstance(protocol, tuple) else (protocol,)
        return "file" in protocols or "local" in protocols

    def path(self, *parts: str) -> str:
        """The full path of a file or folder in the store; on a local disk, refused in one line when a symlink
        on the way leads outside the store's root (a crafted store must not make us read, write or delete
        elsewhere)."""
        if not parts:
            return self.root
        target = "/".join([self.root.rstrip("/"), *parts])
        if self.is_local:
            real = escape(target, self.root, real_root=self._real_root)
            if real is not None:
                raise StratalignError(f"{target} leads outside the store {self.root} (a symlink to {real}); "
                                      "refusing to follow it: replace the link by the folder itself")
        return target

    @functools.cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str, durable: bool = True) -> None:
        """Write a whole file; on a local disk via a temp file and rename, so readers never see half, the temp
        file fsynced before the rename when `durable` (the default; ~1 ms a file here)."""
        target = self.path(*parts)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        if self.is_local:
            _replace_local(target, lambda f: f.write(data), durable)
        else:
            with self.fs.open(target, "wb") as f:
                f.write(data)

    def write_file(self, local_path: str | os.PathLike, *parts: str) -> None:
        """Copy a local file into the store without holding it in memory (a large table); on a local disk as
        `write_bytes` writes (temp file, fsync, rename)."""
        target = self.path(*parts)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        if not self.is_local:
            self.fs.put_file(os.fspath(local_path), target)
            return
        with open(local_path, "rb") as src:
            _replace_local(target, lambda f: shutil.copyfileobj(src, f, 1 << 20), True)

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(self.read_bytes(*parts))
        except json.JSONDecodeError as exc:
            raise StratalignError(f"corrupt JSON file {self.path(*parts)}: {exc}") from None

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode(), *parts)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create a file only if absent. Atomic on local disks (O_EXCL); best effort elsewhere."""
        target = self.path(*parts)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        if self.is_local:
            return _create_exclusive_local(target, data)
        try:  # s3fs and others implement "xb" with conditional writes where the backend can
            with self.fs.open(target, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):
            if self.fs.exists(target):
                return False
            self.write_bytes(data, *parts)
            return self.read_bytes(*parts) == data

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the children of a folder; [] if it does not exist."""
        base = self.path(*parts)
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def listdirs(self, *parts: str) -> list[str]:
        """Names of the sub-folders of a folder (files left out); [] if it does not exist."""
        base = self.path(*parts)
        if not self.fs.exists(base):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(base, detail=True)
                      if e.get("type") == "directory")

    def link_target(self, *parts: str) -> str | None:
        """Where the symlink at this path points (None when it is not one, or the store is not on a local disk).
        A store keeps no links: `store verify` and `store ls` report them, writes refuse them (`refuse_links`)."""
        if not self.is_local or not parts:
            return None
        target = "/".join([self.root.rstrip("/"), *parts])
        return os.readlink(target) if os.path.islink(target) else None

    def linked(self, *parts: str) -> list[str]:
        """Names of the children of a folder that are symlinks (local stores; `listdirs` leaves them out)."""
        if not self.is_local:
            return []
        folder = "/".join([self.root.rstrip("/"), *parts]) if parts else self.root
        if os.path.islink(folder) or not os.path.isdir(folder):
            return []
        return sorted(e.name for e in os.scandir(folder) if e.is_symlink())

    def unlink(self, *parts: str) -> None:
        """Remove the symlink at this path itself, never what it points to (local stores)."""
        os.unlink("/".join([self.root.rstrip("/"), *parts]))

    def refuse_links(self, *parts: str) -> None:
        """A one-line error when any existing folder or file on the way from the root (which may itself be a link)
        to root/parts is a symlink: what a command calls before its work, so that it never does it all and then
        refuses to write it."""
        if not self.is_local:
            return
        here = self.root.rstrip("/") or "/"
        steps = ["/".join([here, *parts[:i + 1]]) for i in range(len(parts))]
        for path in steps:
            if os.path.islink(path):
                raise StratalignError(f"{path} is a symlink (to {os.readlink(path)}): refusing to write through it; "
                                      "replace the link by the folder itself, or remove it")
            if not os.path.exists(path):
                return

    def isdir(self, *parts: str) -> bool:
        return bool(self.fs.isdir(self.path(*parts)))

    def remove(self, *parts: str, recursive: bool = False) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)

    def size(self, *parts: str) -> int:
        target = self.path(*parts)
        return int(self.fs.du(target)) if self.fs.exists(target) else 0


def _create_exclusive_local(target: str, data: bytes) -> bool:
    """Create `target` holding `data` only if absent, never visible empty or half-written: the content goes to a
    temp file that is then hard-linked into place (link fails if the target exists). Where hard links are not
    supported, O_EXCL and a write (a crash in between can leave an empty file; readers treat it as stale)."""
    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.unlink(tmp)


def _replace_local(target: str, write: Callable[[BinaryIO], object], durable: bool) -> None:
    """Write a local file through a temp file and a rename (fsynced first when `durable`): readers never see half
    of it; a failed write removes the temp file and names the target (a full disk: the CLI prints one line)."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), target) from None
        raise
