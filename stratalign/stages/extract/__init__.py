"""Stage 1: run each frozen encoder once over a dataset and write every layer's pooled features.

`extract` is the one entry point (engine=local|ray). A request whose entries are all complete is answered from
its extraction record without loading the encoder or torch (stages.extract.skip); the others go to the engine:
the local one (stages.extract.local: claims, loaders, the overlapped shard pipeline) or Ray (ray_engine), and
their now complete entries are recorded for the next time.

The parts, in the order data flows: config (config, report), plan (per-encoder planning both engines share),
reader (rows -> model-ready batches, loaders) with image_loaders (loader processes), shards (claims, the shard
encoder and writer), pipeline (the local engine's overlapped loop), local (the local engine), ray_engine (Ray),
skip (the no-load answer). This module imports no torch; the engine's names it used to define are still
importable from here (loaded on first use).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any, Callable

from stratalign.encoders.identity import encoder_identity
from stratalign.errors import StratalignError
from stratalign.stages.extract.config import ENGINES, ExtractConfig, ExtractReport
from stratalign.stages.extract.skip import known_complete, remember
from stratalign.store.feature_store import FeatureStore

Identify = Callable[[str], "dict[str, Any] | None"]

# names defined by the engine modules, importable from here as before (loaded on first use: they import torch)
_LAZY = {
    "extract_encoder": "local", "extract_local": "local", "extraction_threads": "local",
    "ShardEncoder": "shards", "choose_loaders": "reader",
    "start_loader_processes": "reader", "entry_specs": "plan", "plan_encoder": "plan",
    "plan_entries": "plan", "resolve_poolings": "plan",
}

__all__ = ["ExtractConfig", "ExtractReport", "extract", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"stratalign.stages.extract.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extract(store: FeatureStore, dataset: str, cfg: ExtractConfig, load: Callable[[str, str], Any] | None = None,
            *, engine: str = "local", ray_address: str | None = None,
            identify: Identify | None = None) -> list[ExtractReport]:
    """Extract every encoder of the config over a stored dataset: with the local engine, or with Ray
    (`ray_address`: a cluster to join; default a local one). `load(spec, device)` loads an encoder.

    `identify(spec)` gives an encoder's cheap identity (encoders.identity), which lets a request that is already
    complete skip loading the model; by default `encoder_identity`, except with a custom `load` (the spec string
    then need not describe what `load` returns), where nothing is skipped unless `identify` is given too."""
    if engine not in ENGINES:
        raise StratalignError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    if not cfg.encoders:
        raise StratalignError("name at least one --encoder")
    if identify is None:
        identify = encoder_identity if load is None else (lambda spec: None)
    ds = store.dataset(dataset)
    if store.mode == "a":  # where it writes: a symlink on the way is refused now, not after the work
        for folder in ("features", "extract_records", "prompts"):
            store.loc.refuse_links(folder)
    identities = {spec: identify(spec) for spec in cfg.encoders}  # before any load: see stages.extract.skip
    done = {spec: known_complete(store, ds, spec, cfg, identities[spec]) for spec in cfg.encoders}
    todo = tuple(spec for spec in cfg.encoders if done[spec] is None)
    made: dict[str, ExtractReport] = {}
    if todo:
        from stratalign.stages.extract.reader import check_image_paths

        check_image_paths(ds)  # a table pointing outside its image roots fails before any model loads
        reports = _run_engine(store, dataset, replace(cfg, encoders=todo), load, engine, ray_address)
        for spec, report in zip(todo, reports):
            remember(store, ds, spec, cfg, identities[spec], report)
            made[spec] = report
    return [done[spec] or made[spec] for spec in cfg.encoders]


def _run_engine(store: FeatureStore, dataset: str, cfg: ExtractConfig, load: Callable[[str, str], Any] | None,
                engine: str, ray_address: str | None) -> list[ExtractReport]:
    if engine == "ray":
        from stratalign.stages.extract.ray_engine import extract_ray

        return extract_ray(store, dataset, cfg, address=ray_address, load=load)
    from stratalign.stages.extract.local import extract_local

    return extract_local(store, dataset, cfg, load)
