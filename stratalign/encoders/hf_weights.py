"""The weight files a transformers model is loaded from (`hf:` encoders): what its `weights_sha256` hashes.

`from_pretrained` prefers model.safetensors, then its sharded index, then pytorch_model.bin (and its index); the
files are found in a local folder or, for a hub id, in the local Hugging Face cache, without loading the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stratalign.encoders.base import weight_files_in

__all__ = ["HF_WEIGHT_FILES", "resolve_weight_files"]

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")  # the order from_pretrained prefers them in


def resolve_weight_files(ident: str, revision: str | None = None,
                          cache_dir: str | os.PathLike | None = None) -> tuple[list[Path], Path | None]:
    """The weight files from_pretrained loads for `ident` (a local folder, or a hub id already in the
    local HF cache): the first of HF_WEIGHT_FILES present, an index expanded to its shards. For a folder
    holding none of those, its weight files of any format. ([], None) when nothing can be found."""
    local = os.path.isdir(ident)

    def locate(name: str) -> Path | None:
        if local:
            path = Path(ident) / name
            return path if path.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(ident, name, cache_dir=cache_dir, revision=revision)
        except Exception:  # noqa: BLE001 - not a valid repo id, no cache: nothing found
            return None
        return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None

    for name in HF_WEIGHT_FILES:
        found = locate(name)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found], found.parent
        try:
            shard_names = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        shards = [locate(n) for n in shard_names]
        if shard_names and all(shards):
            return [p for p in shards if p is not None], found.parent
    if local:
        files = weight_files_in(ident)
        if files:
            return files, Path(ident)
    return [], None
