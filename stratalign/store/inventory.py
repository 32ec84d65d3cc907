"""Everything a store holds, artifact by artifact, with its size and whether what it was made from is gone.

`inventory(store)` lists datasets, feature entries, runs (and each run's eval files and per-query results), layer
results and their heatmaps, recorded layer choices, kNN graphs, prompt caches and extraction records: what
`stratalign store ls` prints and `store rm` removes. An artifact is an orphan when what it was made from is gone:
an entry whose dataset was removed or replaced, a run, layer result, graph or extraction record naming an entry
that is gone, an eval file or choice whose dataset is gone, a prompt cache no entry's encoder and pooling use, a
heatmap without its result. Checking the bytes of each is `store verify`'s job; this only reads names, sizes and
the small JSON or safetensors headers that name their sources.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import prompt_key, slug

KINDS = ("dataset", "entry", "run", "eval", "queries", "tuning", "layers", "heatmap", "choice", "graph", "prompts",
         "extract_record")


@dataclass(frozen=True)
class Artifact:
    """One thing in the store: its kind, name (key, id or file stem), path parts under the root, size in bytes,
    a short description, and why it is an orphan (None when it is not)."""

    kind: str
    name: str
    parts: tuple[str, ...]
    bytes: int
    detail: str = ""
    orphan: str | None = None
    folder: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def _files(store: FeatureStore, *folder: str) -> dict[str, int]:
    """name -> size of the files directly in a folder ({} when it does not exist)."""
    base = store.loc.path(*folder)
    if not store.loc.fs.exists(base):
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in store.loc.fs.ls(base, detail=True) if e.get("type") != "directory"}


def _json(store: FeatureStore, *parts: str) -> dict[str, Any]:
    try:
        doc = store.loc.read_json(*parts)
    except (StratalignError, FileNotFoundError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _safetensors_meta(store: FeatureStore, *parts: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading only its header."""
    try:
        with store.loc.fs.open(store.loc.path(*parts), "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}


def _datasets_and_entries(store: FeatureStore) -> tuple[list[Artifact], dict[str, Any]]:
    out, live = _linked(store, "datasets", "dataset"), {}
    fingerprints = {}
    for name in store.dataset_folders():
        meta = _json(store, "datasets", name, "dataset.json")
        fingerprints[name] = meta.get("content_fingerprint")
        detail = f"{meta.get('n_images', '?')} images, {meta.get('n_captions', '?')} captions" if meta else "broken"
        out.append(Artifact("dataset", name, ("datasets", name), store.loc.size("datasets", name), detail, folder=True))
    for key, entry, why in store.scan_entries():
        orphan = None
        if entry is not None:
            ds = entry.spec.dataset
            if ds not in fingerprints:
                orphan = f"dataset {ds} is gone"
            elif fingerprints[ds] != entry.spec.content_fingerprint:
                orphan = f"dataset {ds} was replaced (other content)"
            spec = entry.spec
            detail = f"{spec.encoder_spec} {spec.pooling}, {spec.rows} rows, layout {spec.format_version}"
            live[key] = entry
        else:
            detail = f"broken: {why}"
        linked = store.loc.link_target("features", key)
        if linked is not None:
            out.append(Artifact("entry", key, ("features", key), 0, f"a symlink to {linked}", _link(linked), True))
            continue
        out.append(Artifact("entry", key, ("features", key), store.loc.size("features", key), detail, orphan, True))
    return out, live


def _link(target: str) -> str:
    return f"a symlink to {target} (a store keeps no links: `store rm` removes the link, never its target)"


def _linked(store: FeatureStore, folder: str, kind: str) -> list[Artifact]:
    """Symlinks in place of dataset or run folders: reported as orphans (what they point to is not the store's)."""
    out = []
    for name in store.loc.linked(folder):
        target = store.loc.link_target(folder, name) or "?"
        out.append(Artifact(kind, name, (folder, name), 0, f"a symlink to {target}", _link(target), True))
    return out


def _runs(store: FeatureStore, entries: set[str], datasets: set[str]) -> list[Artifact]:
    out = _linked(store, "runs", "run")
    for rid in store.loc.listdirs("runs"):
        files = _files(store, "runs", rid)
        cfg = _json(store, "runs", rid, "config.json")
        gone = [e for e in (cfg.get("vision_entry"), cfg.get("text_entry")) if e and e not in entries]
        orphan = f"entry {gone[0]} is gone" if gone else (
            f"dataset {cfg['dataset']} is gone" if cfg.get("dataset") and cfg["dataset"] not in datasets else None)
        done = "metrics.json" in files
        detail = f"{cfg.get('objective', '?')} {cfg.get('vision', '?')} x {cfg.get('text', '?')}"
        detail += "" if done else ", unfinished"
        out.append(Artifact("run", rid, ("runs", rid), sum(files.values()), detail, orphan, True))
        for name, size in files.items():
            if name.startswith("eval-") and name.endswith(".json"):
                ds = name[len("eval-"):-len(".json")]
                out.append(Artifact("eval", f"{rid}/{ds}", ("runs", rid, name), size, f"run {rid} on {ds}",
                                    orphan or (f"dataset {ds} is gone" if ds not in datasets else None)))
            elif name == "queries.safetensors":
                out.append(Artifact("queries", rid, ("runs", rid, name), size, f"per-query results of {rid}", orphan))
            elif name.startswith("tuning-") and name.endswith(".json"):
                out.append(Artifact("tuning", f"{rid}/{name[len('tuning-'):-len('.json')]}", ("runs", rid, name), size,
                                    f"the validation grid {rid} was chosen from", orphan))
    return out


def _layer_results(store: FeatureStore, entries: set[str], datasets: set[str]) -> list[Artifact]:
    out: list[Artifact] = []
    files = _files(store, "layers")
    lost: dict[str, str | None] = {}
    for name, size in sorted(files.items()):
        if name.endswith(".json"):
            settings = _json(store, "layers", name).get("settings", {})
            gone = [e for e in (settings.get("vision_entry"), settings.get("text_entry")) if e and e not in entries]
            lost[name[:-5]] = f"entry {gone[0]} is gone" if gone else None
            out.append(Artifact("layers", name[:-5], ("layers", name), size,
                                f"{settings.get('vision', '?')} x {settings.get('text', '?')}, n={settings.get('n', '?')}",
                                lost[name[:-5]]))
    for name, size in sorted(files.items()):
        if name.endswith(".png"):
            stem = name[:-4]
            why = lost[stem] if stem in lost else f"layer result {stem} is gone"
            out.append(Artifact("heatmap", stem, ("layers", name), size, "layer-similarity heatmap", why))
    for name, size in sorted(_files(store, "choices").items()):
        doc = _json(store, "choices", name)
        ds = name.split("--", 1)[0]
        out.append(Artifact("choice", name[:-len(".json")], ("choices", name), size,
                            f"layers {doc.get('vision_layer', '?')},{doc.get('text_layer', '?')} ({doc.get('rule', '?')})",
                            None if ds in {slug(d, 50) for d in datasets} else f"dataset {ds} is gone"))
    return out


def _caches(store: FeatureStore, entries: dict[str, Any]) -> list[Artifact]:
    out = []
    for name, size in sorted(_files(store, "graphs").items()):
        meta = _safetensors_meta(store, "graphs", name)
        gone = [e for e in (meta.get("vision_entry"), meta.get("text_entry")) if e and e not in entries]
        out.append(Artifact("graph", name.split(".", 1)[0], ("graphs", name), size,
                            f"kNN graphs, k={meta.get('k', '?')}, n={meta.get('n_train', '?')}",
                            f"entry {gone[0]} is gone" if gone else None))
    uses = {(json.dumps(e.spec.encoder, sort_keys=True), e.spec.pooling): e for e in entries.values()}
    for name, size in sorted(_files(store, "prompts").items()):
        stem = name.split(".", 1)[0]
        prompts = json.loads(_safetensors_meta(store, "prompts", name).get("prompts", "[]"))
        used = any(prompt_key(e.spec.encoder, e.spec.pooling, prompts) == stem for e in uses.values())
        out.append(Artifact("prompts", stem, ("prompts", name), size, f"{len(prompts)} zero-shot prompts",
                            None if used else "no entry's encoder and pooling use it"))
    for name, size in sorted(_files(store, "extract_records").items()):
        named = _json(store, "extract_records", name).get("entries", [])
        gone = [e for e in named if e not in entries]
        out.append(Artifact("extract_record", name[:-len(".json")], ("extract_records", name), size,
                            f"{len(named)} entries", f"entry {gone[0]} is gone" if gone else None))
    return out


def inventory(store: FeatureStore) -> list[Artifact]:
    """Every artifact in the store (see the module docstring), datasets and entries first."""
    base, entries = _datasets_and_entries(store)
    datasets = {a.name for a in base if a.kind == "dataset"}
    return base + _runs(store, set(entries), datasets) + _layer_results(store, set(entries), datasets) + \
        _caches(store, entries)


def find(store: FeatureStore, kind: str, name: str) -> Artifact:
    """The artifact of a kind by name; a one-line error lists the kinds or says it is not there."""
    if kind not in KINDS:
        raise StratalignError(f"unknown artifact kind {kind!r}; kinds: {', '.join(KINDS)}")
    for a in inventory(store):
        if a.kind == kind and a.name == name:
            return a
    raise StratalignError(f"no {kind} {name!r} in {store.url}; see `stratalign store ls`")


def remove(store: FeatureStore, artifact: Artifact) -> None:
    """Remove one artifact (a folder with everything in it, or one file; a symlink itself, never its target)."""
    store.require_writable()
    if store.loc.link_target(*artifact.parts) is not None:
        store.loc.unlink(*artifact.parts)
    elif artifact.kind == "dataset":
        store.remove_dataset(artifact.name)
    elif artifact.kind == "entry":
        store.remove_entry(artifact.name)
    else:
        store.loc.remove(*artifact.parts, recursive=artifact.folder)
