"""Content addresses: one hash helper, `content_hash`, and the key of every artifact the store names by content.

A key is the sha256 of the JSON of everything that determines the artifact, so a changed input makes a new
key and never a stale hit. The recipes grew apart over time (separators, sorted keys, truncation); each is
frozen as it is (v1), since changing a single byte would orphan every artifact of every existing store, and
each key function below names its recipe through `content_hash`'s parameters. tests/store/test_keys.py pins them.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Sequence

import numpy as np

from stratalign.store.location import validate_key

FORMAT_VERSION = 1  # the store format: part of every entry key, stamped into the store root and each dataset


def canonical_json(obj: Any, *, compact: bool = True, sort_keys: bool = True) -> bytes:
    """The JSON bytes a key hashes: ASCII-escaped, keys sorted unless told, `,`/`:` separators when compact
    (`, `/`: ` otherwise, json's default)."""
    return json.dumps(obj, sort_keys=sort_keys, separators=(",", ":") if compact else None).encode()


def content_hash(obj: Any, *, length: int | None = None, compact: bool = True, sort_keys: bool = True,
                 blobs: Iterable[bytes] = ()) -> str:
    """sha256 hex of `canonical_json(obj)` followed by any raw `blobs`, cut to `length` characters if given."""
    h = hashlib.sha256(canonical_json(obj, compact=compact, sort_keys=sort_keys))
    for blob in blobs:
        h.update(blob)
    digest = h.hexdigest()
    return digest if length is None else digest[:length]


def slug(text: str, max_len: int = 60) -> str:
    """A readable, path-safe piece of a key (lossy: the hash beside it is what tells keys apart)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:max_len] or "x"


def entry_key(identity: dict[str, Any]) -> str:
    """Feature entry: <dataset>--<modality>--<encoder>--<pooling>--<hash>. Frozen v1 recipe: compact, sorted,
    16 hex characters."""
    h = content_hash(identity, length=16)
    return (f"{slug(identity['dataset'])}--{identity['modality']}--{slug(str(identity['encoder']['spec']))}--"
            f"{identity['pooling']}--{h}")


def content_fingerprint(images: Sequence[tuple[str, str, str]], captions: Sequence[tuple[str, str, str]]) -> str:
    """A dataset's content: (image id, relpath, image sha) and (caption id, image id, text) rows, in table order.
    Frozen v1 recipe: compact, sorted, full length."""
    return content_hash({"images": list(images), "captions": list(captions)})


def content_fingerprint_batches(images: Iterable[Sequence[tuple[str, str, str]]],
                                captions: Iterable[Sequence[tuple[str, str, str]]]) -> str:
    """`content_fingerprint` of rows given in batches: the same bytes hashed as they come, never joined into one
    JSON document (a 590k-caption dataset's is ~60 MB)."""
    h = hashlib.sha256(b'{"captions":')
    _hash_json_array(h, captions)
    h.update(b',"images":')
    _hash_json_array(h, images)
    h.update(b"}")
    return h.hexdigest()


def _hash_json_array(h: Any, batches: Iterable[Sequence[tuple]]) -> None:
    """Feed h the compact JSON array of every batch's rows, exactly as canonical_json writes the whole list."""
    h.update(b"[")
    first = True
    for batch in batches:
        if len(batch):
            h.update((b"" if first else b",") + canonical_json(list(batch))[1:-1])
            first = False
    h.update(b"]")


def dataset_fingerprint(content: str, splits: list[str], labels: list[str | None],
                        templates: list[str] | None = None) -> str:
    """A dataset version: its content fingerprint plus the split and label of each image, and its zero-shot
    templates when they are not its source's default ones (None: the recipe, hence the fingerprint, of every
    dataset ingested before templates could be set). Frozen v1 recipe: compact, sorted, full length."""
    parts: dict[str, Any] = {"content": content, "split": splits, "label": labels}
    if templates is not None:
        parts["templates"] = list(templates)
    return content_hash(parts)


def run_id_of(config: dict[str, Any]) -> str:
    """A readable, content-addressed run id: <objective>-<head>-n<pairs>-s<seed>-<hash>. Frozen v1 recipe:
    compact, sorted, 12 hex characters."""
    h = content_hash(config, length=12)
    obj = re.sub(r"[^a-z0-9]+", "_", str(config.get("objective", "run")).lower())
    return f"{obj}-{config.get('head', 'head')}-n{config.get('n_pairs', 'all')}-s{config.get('seed', 0)}-{h}"


def tuning_key(run_ids: Sequence[str]) -> str:
    """Key of a tuning record (runs/<chosen>/tuning-<key>.json): the grid's run ids, in grid order."""
    return content_hash(list(run_ids))[:12]


def layer_result_key(settings: dict[str, Any]) -> str:
    """Layer-similarity result: <dataset>--<vision>--<text>--<hash>. Frozen v1 recipe: json's default
    separators, sorted, 12 hex characters; slugs of at most 50 characters."""
    h = content_hash(settings, compact=False, length=12)
    return f"{slug(settings['dataset'], 50)}--{slug(settings['vision'], 50)}--{slug(settings['text'], 50)}--{h}"


def choice_name(dataset: str, vision: str, text: str) -> str:
    """File name of a recorded layer choice (readable, not hashed)."""
    return f"{slug(dataset, 50)}--{slug(vision, 50)}--{slug(text, 50)}.json"


def prompt_key(encoder: dict[str, Any], pooling: str, prompts: list[str]) -> str:
    """Prompt features of one text entry's encoder and pooling. Frozen v1 recipe: json's default separators,
    sorted, 24 hex characters."""
    return content_hash({"encoder": encoder, "pooling": pooling, "prompts": prompts}, compact=False, length=24)


def graph_key(vision_entry: str, vision_layer: int, text_entry: str, text_layer: int, image_rows: np.ndarray,
              caption_rows: np.ndarray, k: int) -> str:
    """sha256 hex of (entries, layers, training rows, k): the file name stem of cached kNN graphs. Frozen v1
    recipe: the JSON list in json's default separators, then for each row array its length (8 bytes
    little-endian) and its int64 little-endian bytes; full length."""
    blobs = []
    for rows in (image_rows, caption_rows):
        arr = np.ascontiguousarray(np.asarray(rows, dtype="<i8"))
        blobs += [len(arr).to_bytes(8, "little"), arr.tobytes()]
    ident = [vision_entry, int(vision_layer), text_entry, int(text_layer), int(k)]
    return validate_key(content_hash(ident, compact=False, sort_keys=False, blobs=blobs), "graph key")


def extract_record_key(dataset: str, content_fingerprint: str, encoder: str, poolings: Sequence[str], dtype: str,
                       shard_rows: int, precision: str = "fp32") -> str:
    """Extraction record (store.extract_records) of one extraction request: <dataset>--<encoder>--<hash>. v1
    recipe: compact, sorted, 16 hex characters of everything the request names (the encoder by its spec string,
    the poolings as requested: empty for the encoder's default, the forward precision when not fp32, so fp32
    records keep their keys) and the store format."""
    request = {"dataset": dataset, "content_fingerprint": content_fingerprint, "encoder": encoder,
               "poolings": list(poolings), "dtype": dtype, "shard_rows": int(shard_rows), "format_version": FORMAT_VERSION}
    if precision != "fp32":
        request["precision"] = precision
    h = content_hash(request, length=16)
    return f"{slug(dataset, 50)}--{slug(encoder, 50)}--{h}"


def index_key(run_id: str, dataset_fingerprint: str, modality: str, split: str | None) -> str:
    """Search index of one dataset (version) in one run's space: <run id>--<modality>--<split|all>--<hash>."""
    h = content_hash({"run": run_id, "dataset": dataset_fingerprint, "modality": modality, "split": split}, length=12)
    return f"{run_id}--{modality}--{split or 'all'}--{h}"
