"""`stratalign embed`: images and texts (or a whole dataset) to embeddings on disk, clip-retrieval style.

Inputs: image files, folders (searched recursively for image files), globs (`shots/**/*.jpg`) and list files
(`.txt` / `.lst`: one path per line, relative to the list's folder); texts given one by one or from a list file.
A dataset's rows come from the store's cached features when it holds the run's layers (no encoder runs); its image
paths pass the containment rule first. Output, in a folder:

    img_emb/img_emb_0.npy     (n_images, d) float32 unit rows      text_emb/text_emb_0.npy   (n_texts, d)
    metadata/img_metadata_0.parquet   row-aligned: image_path, dataset row (or null), from_store
    metadata/text_metadata_0.parquet  row-aligned: caption, dataset row (or null), from_store

A path ending in .parquet writes the older single file instead (kind, item, embedding).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.containment import DatasetMedia
from stratalign.use.cached import CachedFeatures
from stratalign.use.model import AlignedModel

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTS = (".txt", ".lst", ".list")
CHUNK = 256  # items per encoder call between progress updates


def expand_images(specs: Sequence[str]) -> list[str]:
    """Image files from paths, folders, globs and list files, in the order given (a folder's files sorted)."""
    out: list[str] = []
    for spec in specs:
        p = Path(spec)
        if any(ch in spec for ch in "*?[") and not p.exists():
            found = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not found:
                raise StratalignError(f"--images {spec!r} matches no file")
            out += found
        elif p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise StratalignError(f"folder {spec} holds no image files ({', '.join(IMAGE_EXTS)})")
            out += found
        elif p.suffix.lower() in LIST_EXTS:
            out += [str(p.parent / line) if not os.path.isabs(line) else line for line in _lines(p)]
        else:
            out.append(spec)
    return out


def expand_texts(specs: Sequence[str], files: Sequence[str] = ()) -> list[str]:
    """Texts given one by one, then the lines of text list files."""
    return list(specs) + [line for f in files for line in _lines(Path(f))]


def _lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise StratalignError(f"list file {path} cannot be read ({type(exc).__name__})") from None
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class Part:
    """One modality's embeddings and the metadata of their rows."""

    modality: str
    items: list[str]
    z: np.ndarray
    rows: list[int | None] = field(default_factory=list)
    from_store: list[bool] = field(default_factory=list)


def embed_items(model: AlignedModel, items: list[Any], modality: str, cached: CachedFeatures | None,
                progress: Callable[[int], None]) -> Part:
    """Embeddings of items in chunks (a progress tick per chunk): store rows where `cached` holds them."""
    zs, rows, hit = [], [], []
    for s in range(0, len(items), CHUNK):
        chunk = items[s:s + CHUNK]
        r = cached.rows_of(chunk, modality) if cached is not None else [None] * len(chunk)
        x = cached.features(chunk, modality) if cached is not None else model.features(chunk, modality)
        zs.append(model.encode_features(x, modality))
        rows += r
        hit += [v is not None for v in r]
        progress(len(chunk))
    return Part(modality, [str(i) for i in items], np.concatenate(zs), rows, hit)


def embed_dataset(store: Any, model: AlignedModel, dataset: str, progress: Callable[[int], None]) -> list[Part]:
    """Every image and caption of a dataset: its cached features through the heads when the store holds the run's
    layers, else encoded (image files through the containment rule)."""
    ds = store.dataset(dataset)
    paths = DatasetMedia.of(ds).check()  # a crafted row is refused before anything is written
    cached = CachedFeatures(store, model, dataset)
    parts = []
    for modality, items in (("image", paths), ("text", ds.captions["text"].to_list())):
        entry = cached.entries[modality]
        if entry is None:
            parts.append(embed_items(model, items, modality, None, progress))
            parts[-1].rows = list(range(len(items)))
            continue
        zs = []
        for s in range(0, len(items), 8 * CHUNK):
            rows = np.arange(s, min(s + 8 * CHUNK, len(items)))
            x = entry.read_layer(model.towers[modality].layer, rows).astype(np.float32)
            zs.append(model.encode_features(x, modality))
            progress(len(rows))
        parts.append(Part(modality, items, np.concatenate(zs), list(range(len(items))), [True] * len(items)))
    return parts


def write_parts(out: str, parts: list[Part]) -> list[str]:
    """Write embeddings + metadata (see the module docstring); the files written."""
    import polars as pl

    if out.endswith(".parquet"):
        frame = pl.concat([pl.DataFrame({"kind": [p.modality] * len(p.items), "item": p.items, "embedding": p.z.tolist()},
                                        schema={"kind": pl.Utf8, "item": pl.Utf8, "embedding": pl.List(pl.Float32)})
                           for p in parts])
        frame.write_parquet(out)
        return [out]
    folder = Path(out)
    written = []
    for p in parts:
        short = "img" if p.modality == "image" else "text"
        (folder / f"{short}_emb").mkdir(parents=True, exist_ok=True)
        (folder / "metadata").mkdir(parents=True, exist_ok=True)
        emb = folder / f"{short}_emb" / f"{short}_emb_0.npy"
        np.save(emb, np.ascontiguousarray(p.z, dtype=np.float32))
        meta = folder / "metadata" / f"{short}_metadata_0.parquet"
        pl.DataFrame({"image_path" if p.modality == "image" else "caption": p.items,
                      "dataset_row": p.rows or [None] * len(p.items),
                      "from_store": p.from_store or [False] * len(p.items)},
                     schema_overrides={"dataset_row": pl.Int64}).write_parquet(meta)
        written += [str(emb), str(meta)]
    return written
