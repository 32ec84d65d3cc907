"""Nothing to do costs nothing: an extraction request whose entries are all complete is answered without loading
the encoder (no torch either), from the extraction record (store.extract_records) of the request.

The record is written after a request's entries are complete, with the encoder identity computed BEFORE the model
was loaded (encoders.identity: every file the encoder is built from, the stratalign code, library versions); if a
file changed between that moment and the load, the record holds the old identity and the next request loads the
model again. A request skips the load only when the identity computed now equals the recorded one, every entry
the record names is complete, and (text encoders on a labelled dataset) their zero-shot prompt features are
cached. Anything else, or a spec whose identity cannot be known cheaply, goes the usual way.
"""

from __future__ import annotations

import time
from typing import Any

from stratalign.stages.extract.config import ExtractConfig, ExtractReport
from stratalign.stages.prompts import class_prompts
from stratalign.store import extract_records, prompt_cache
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import extract_record_key, prompt_key


def record_key(ds: PairDataset, spec: str, cfg: ExtractConfig) -> str:
    return extract_record_key(ds.name, ds.content_fingerprint, spec, cfg.poolings, cfg.dtype, cfg.shard_rows,
                              cfg.precision)


def known_complete(store: FeatureStore, ds: PairDataset, spec: str, cfg: ExtractConfig,
                   identity: dict[str, Any] | None) -> ExtractReport | None:
    """The report of a request already fully done (nothing encoded, no model loaded), or None when the model
    must be loaded to tell. `identity` is `encoder_identity(spec)`, computed by the caller before any load."""
    t0 = time.perf_counter()
    if identity is None:
        return None
    record = extract_records.load(store, record_key(ds, spec, cfg))
    if record is None or record.get("identity") != identity or not record.get("entries"):
        return None
    entries = []
    for key in record["entries"]:
        if not store.entry_exists(key):
            return None
        entry = store.entry(key)
        if entry.spec.content_fingerprint != ds.content_fingerprint or not entry.is_complete():
            return None
        entries.append(entry)
    if not _prompts_cached(store, ds, entries):
        return None
    return ExtractReport(encoder=spec, entries=[e.key for e in entries], shards_total=entries[0].spec.n_shards,
                         wall_s=time.perf_counter() - t0, loaders="none (complete, model not loaded)")


def _prompts_cached(store: FeatureStore, ds: PairDataset, entries: list) -> bool:
    """Whether the zero-shot prompt features that extraction caches for these entries are there."""
    if not ds.class_names or entries[0].spec.modality != "text":
        return True
    prompts = class_prompts(ds)[2]
    return all(prompt_cache.exists(store, prompt_key(e.spec.encoder, e.spec.pooling, prompts)) for e in entries)


def remember(store: FeatureStore, ds: PairDataset, spec: str, cfg: ExtractConfig, identity: dict[str, Any] | None,
             report: ExtractReport) -> bool:
    """Record a request whose entries are now all complete (True when recorded). Nothing is recorded for a spec
    without a cheap identity, for a read-only store, or while some shard is still missing."""
    if identity is None or store.mode != "a" or not report.entries:
        return False
    if not all(store.entry_exists(k) and store.entry(k).is_complete() for k in report.entries):
        return False
    request = {"dataset": ds.name, "content_fingerprint": ds.content_fingerprint, "encoder": spec,
               "poolings": list(cfg.poolings), "dtype": cfg.dtype, "shard_rows": cfg.shard_rows, "precision": cfg.precision}
    extract_records.save(store, record_key(ds, spec, cfg),
                         {"request": request, "identity": identity, "entries": list(report.entries)})
    return True
