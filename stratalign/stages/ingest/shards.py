"""Readers of sources that arrive at scale: webdataset tar shards (as img2dataset writes them) and Hugging Face
datasets (a `save_to_disk` folder, or Arrow / Parquet files), turned into raw records like stages.ingest.sources'.

Both stream: a tar is read member by member, a table batch by batch, so memory holds the captions and names,
never the images. Images inside a tar stay there: a record's path is fsspec's chained URL
`tar://<member>::<shard url>` (read by store.media like any URL, the tar's index built once per process).
Images embedded in a Hugging Face table (an `Image` column's bytes) are written once into `image_dir`.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
import polars as pl

from stratalign.errors import StratalignError
from stratalign.progress import progress_bar
from stratalign.store.raw_records import Spill, SpilledFrame, caption_columns, image_columns

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
HF_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard URLs from a list, a brace range (`shards-{00000..00009}.tar`, as webdataset writes them) or a glob."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += expand_shards([s[:m.start()] + f"{i:0{width}d}" + s[m.end():] for i in range(lo, hi + 1)])
        elif any(c in s for c in "*?["):
            fs, pattern = fsspec.core.url_to_fs(s)
            found = sorted(fs.glob(pattern))
            if not found:
                raise StratalignError(f"no webdataset shards match {s!r}")
            out += [fs.unstrip_protocol(f) if "://" in s else f for f in found]
        else:
            out.append(s)
    return out


def _tar_members(url: str, left_out: dict[str, list[str]]) -> Iterator[tuple[str, str, str, tarfile.TarFile,
                                                                           tarfile.TarInfo]]:
    """(key, extension, member name, tar, member) of each file of one shard, streamed in tar order. Members that
    cannot be a pair's file go to `left_out` under their reason: links and other non-files, paths that climb out
    of the shard (`..`, absolute), files with no `<key>.<ext>` name."""
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():
                    left_out.setdefault("link or other non-file member", []).append(member.name)
                    continue
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts:
                    left_out.setdefault("path outside the shard ('..' or absolute)", []).append(member.name)
                    continue
                folder, base = posixpath.split(member.name)
                if "." not in base or base.startswith("."):
                    left_out.setdefault("no <key>.<ext> name", []).append(member.name)
                    continue
                stem, ext = base.split(".", 1)
                yield posixpath.join(folder, stem), ext.lower(), member.name, tar, member
    except FileNotFoundError:
        raise StratalignError(f"webdataset shard not found: {url}") from None
    except tarfile.TarError as exc:
        raise StratalignError(f"webdataset shard {url} is not a readable tar: {exc}") from None


def read_webdataset(shards: str | list[str], caption_ext: str = "txt", progress: bool = False,
                    keep_unpaired: bool = False, **kw: Any) -> tuple[pl.DataFrame, SpilledFrame, dict]:
    """webdataset tar shards: per key an image (`.jpg`, `.png`, `.webp`, ...) and its caption (`.txt`, or the
    `caption` field of `.json`). Keys without an image or a caption, links and paths outside the shard are left out
    and counted by reason (source["left_out"]); an image id is the key. The
    captions are spilled to a temporary folder as they come (bounded memory: see store.raw_records). keep_unpaired:
    an image without a caption, or a caption without an image, is taken unpaired (docs/method.md § 3.11), not left
    out."""
    urls = expand_shards(shards)
    images, captions = image_columns(), caption_columns(Spill())
    left_out: dict[str, list[str]] = {}
    for url in progress_bar(urls, desc="webdataset shards", unit="shard", disable=None if progress else True):
        shard_name = posixpath.basename(url.rstrip("/"))
        found: dict[str, dict[str, str]] = {}
        for key, ext, name, tar, member in _tar_members(url, left_out):
            item = found.setdefault(key, {})
            if ext in IMAGE_EXTS and "image" not in item:
                item["image"] = name
            elif ext == caption_ext or (ext == "json" and "text" not in item):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                text = raw.strip() if ext != "json" else _json_caption(raw)
                if text is not None:
                    item["text"] = text
        for key, item in found.items():
            if "image" in item and ("text" in item or keep_unpaired):
                images.append(key, f"tar://{item['image']}::{url}", f"{shard_name}/{item['image']}")
                if "text" in item:
                    captions.append(key, key, item["text"])
            elif "image" in item:
                left_out.setdefault(f"image without a caption (.{caption_ext} or .json)", []).append(item["image"])
            elif "text" in item and keep_unpaired:  # a caption without an image (docs/method.md § 3.11)
                captions.append(key, None, item["text"])
            elif "text" in item:
                left_out.setdefault("caption without an image", []).append(key)
    if not len(images):
        raise StratalignError(f"no (image, caption) pairs in the webdataset shards {urls[:3]}"
                              + "".join(f"; {len(v)} {k}" for k, v in left_out.items()))
    source = {"kind": "webdataset", "shards": urls, "caption_ext": caption_ext}
    if left_out:  # what `ingest webdataset` says it did not take, with examples
        source["left_out"] = {k: {"count": len(v), "examples": v[:3]} for k, v in left_out.items()}
    return images.frame(), captions.frame(), source


def _json_caption(raw: str) -> str | None:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return str(doc["caption"]) if isinstance(doc, dict) and doc.get("caption") is not None else None


def _hf_tables(path: str) -> list[tuple[str | None, list[str]]]:
    """(split, files) of a Hugging Face dataset: a `save_to_disk` folder (one dataset, or a DatasetDict with a
    folder per split), a folder of Parquet files, or one Parquet / Arrow file."""
    p = Path(path)
    if not p.exists():
        raise StratalignError(f"Hugging Face dataset not found: {path}")
    if p.is_file():
        return [(None, [str(p)])]
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        return [(s, sorted(str(f) for f in (p / s).glob("*.arrow"))) for s in splits]
    arrow = sorted(str(f) for f in p.glob("*.arrow"))
    if arrow:
        return [(None, arrow)]
    parquet = sorted(p.rglob("*.parquet"))
    if not parquet:
        raise StratalignError(f"{path} holds no Hugging Face dataset (no dataset_dict.json, .arrow or .parquet files)")
    by_split: dict[str | None, list[str]] = {}
    for f in parquet:  # the Hub's layout: data/<split>-00000-of-00001.parquet
        split = f.name.split("-", 1)[0] if f.name.split("-", 1)[0] in HF_SPLITS else None
        by_split.setdefault(split, []).append(str(f))
    return list(by_split.items())


def _batches(file: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.endswith(".parquet"):
        yield from pq.ParquetFile(file).iter_batches(batch_size=1024)
        return
    with pa.memory_map(file) as source:
        try:
            reader = pa.ipc.open_stream(source)  # what save_to_disk writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches)) \
            if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader


def _image_file(value: Any, image_dir: Path, name: str) -> tuple[str, str]:
    """(path, relpath) of one image cell: a path string, or an `Image` struct (bytes written into image_dir)."""
    if isinstance(value, str):
        return value, value
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        ext = (Path(value.get("path") or "").suffix or _sniff(data)).lstrip(".")
        target = image_dir / f"{name}.{ext}"
        if not target.exists() or target.read_bytes() != data:  # written once; a rerun finds it in place
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return str(target), f"{name}.{ext}"
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"]), str(value["path"])
    raise StratalignError(f"image cell {name} holds neither a path nor image bytes")


def _sniff(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return (im.format or "png").lower().replace("jpeg", "jpg")


def read_hf(path: str, image_col: str = "image", text_col: str = "text", image_dir: str | None = None,
            progress: bool = False, **kw: Any) -> tuple[pl.DataFrame, SpilledFrame, dict]:
    """A local Hugging Face dataset (or Arrow / Parquet files) with an image column (an `Image` feature or paths)
    and a text column (one caption, or a list of captions per image). Splits come from the dataset's split
    names (validation -> val). Embedded image bytes are written once into `image_dir` (default:
    `<path>-images`), as the store keeps images by path. The captions are spilled to a temporary folder as they
    come (bounded memory: see store.raw_records)."""
    out_dir = Path(image_dir or f"{str(path).rstrip('/')}-images")
    images, captions = image_columns(), caption_columns(Spill())
    for split, files in _hf_tables(path):
        for file in files:
            for batch in progress_bar(_batches(file), desc=f"{Path(file).name}", unit="batch",
                              disable=None if progress else True):
                cols = batch.schema.names
                for col, flag in ((image_col, "--image-col"), (text_col, "--text-col")):
                    if col not in cols:
                        raise StratalignError(f"{file} has no column {col!r} (given by {flag}); columns: {cols}")
                for img, text in zip(batch.column(image_col).to_pylist(), batch.column(text_col).to_pylist()):
                    iid = f"{split or 'all'}-{len(images):08d}"
                    p, rel = _image_file(img, out_dir, iid)
                    images.append(iid, p, rel, HF_SPLITS.get(split or "", None))
                    texts = text if isinstance(text, list) else [text]
                    for j, t in enumerate(texts):
                        captions.append(f"{iid}-{j}", iid, "" if t is None else str(t))
    return images.frame(), captions.frame(), {"kind": "hf", "path": str(path), "image_col": image_col, "text_col": text_col,
                              "image_dir": str(out_dir)}
