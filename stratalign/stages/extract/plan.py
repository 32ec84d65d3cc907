"""Per-encoder planning that both extraction engines share (local and Ray): which entries a loaded encoder
fills (their specs, hence keys) and, for a text encoder over a dataset with classes, the zero-shot prompt
features cached in the store."""

from __future__ import annotations

from typing import Any

from stratalign.errors import StratalignError
from stratalign.stages.extract.config import ExtractConfig
from stratalign.stages.prompts import cache_class_prompts
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import EntrySpec, FeatureEntry, FeatureStore


def resolve_poolings(encoder: Any, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The poolings to extract: the encoder's default for none, all it supports for ("all",)."""
    if not requested:
        return (encoder.default_pooling,)
    if requested == ("all",):
        return tuple(encoder.poolings)
    bad = [p for p in requested if p not in encoder.poolings]
    if bad:
        raise StratalignError(f"pooling {bad[0]!r} not supported by {encoder.spec}; supported: {encoder.poolings}")
    return tuple(dict.fromkeys(requested))


def entry_specs(ds: PairDataset, encoder: Any, cfg: ExtractConfig) -> list[EntrySpec]:
    """The specs (hence keys) of the entries this encoder fills, one per pooling; nothing is written."""
    rows = ds.images.height if encoder.modality == "image" else ds.captions.height
    meta = encoder.metadata()
    meta.setdefault("default_pooling", encoder.default_pooling)
    return [EntrySpec(dataset=ds.name, content_fingerprint=ds.content_fingerprint, modality=encoder.modality,
                      encoder=meta, pooling=pooling, layer_names=tuple(encoder.layer_names),
                      dims=tuple(encoder.dims), rows=rows, dtype=cfg.dtype, shard_rows=cfg.shard_rows,
                      format_version=cfg.entry_format, precision=cfg.precision)
            for pooling in resolve_poolings(encoder, cfg.poolings)]


def plan_entries(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig) -> list[FeatureEntry]:
    """Create (or open) the entries this encoder fills: one per pooling, keyed by content."""
    return [store.create_entry(spec) for spec in entry_specs(ds, encoder, cfg)]


def plan_encoder(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig, device: str) -> list[EntrySpec]:
    """The per-encoder planning both engines share: the specs (hence keys) of the entries a loaded encoder
    fills, and for a text encoder over a dataset with classes its zero-shot prompt features, cached in the
    store so that evaluation never loads the encoder."""
    specs = entry_specs(ds, encoder, cfg)
    cache_class_prompts(store, ds, specs, encoder, device)
    return specs
