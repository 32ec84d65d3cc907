"""The local extraction engine: each encoder's shards encoded in this process (see stages.extract for the flow,
the entry point and the no-load shortcut).

Work is cut into store shards (`shard_rows` rows each). A worker claims a shard (see store.claims),
loads and preprocesses its rows in the background while the model runs (on CPU, images in low-priority
loader processes, see image_loaders.py; otherwise loader threads), pools every layer in one forward pass,
and hands the shard's blocks to a background writer that writes all layers and then the completion marker.
A heartbeat thread keeps the claims fresh meanwhile, and a claim won just after another worker finished the
shard is dropped again. On CPU, torch gets the CPUs available to the process.
Batches never straddle shards and are cut the same way on every run, so a resumed or distributed run
writes byte-identical shards to an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from stratalign.device import cpu_threads, resolve_device, torch_threads
from stratalign.errors import StratalignError
from stratalign.stages.extract.config import ExtractConfig, ExtractReport
from stratalign.stages.extract.pipeline import ShardPipeline
from stratalign.stages.extract.plan import entry_specs, plan_encoder
from stratalign.stages.extract.reader import (
    BatchPreparer,
    Hunger,
    batches,
    choose_loaders,
    make_loader,
    start_loader_processes,
)
from stratalign.stages.extract.shards import ShardEncoder, pending_union
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import EntrySpec, FeatureStore

__all__ = ["extract_encoder", "extract_local", "extraction_threads"]


def extraction_threads(cfg: ExtractConfig, device: torch.device) -> int:
    """torch intra-op threads for extraction: `cfg.torch_threads` when set; on CPU every CPU available to
    the process (affinity mask and container quota, where torch's own default counts the host's cores);
    on a GPU torch's current setting. No CPU is held back for the loader threads: decoding and resizing a
    batch costs a few percent of its forward pass (measured in benchmarks/extract.py), and one torch thread
    fewer would cost half the forward speed on a 2-core machine."""
    if cfg.torch_threads or device.type == "cpu":
        return cpu_threads(cfg.torch_threads)
    return torch.get_num_threads()


def extract_encoder(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig,
                    device: torch.device | None = None, on_shard: Callable[[int], None] | None = None, *,
                    specs: list[EntrySpec] | None = None) -> ExtractReport:
    """Fill this encoder's entries for the dataset with the local engine (resumable, concurrent-safe);
    `specs` are the entries' specs when the caller has planned them already."""
    device = device or resolve_device(cfg.device)
    with torch_threads(extraction_threads(cfg, device)) as n_threads:
        return _extract_encoder(store, ds, encoder, cfg, device, on_shard, n_threads, specs)


def _extract_encoder(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig, device: torch.device,
                     on_shard: Callable[[int], None] | None, n_threads: int,
                     specs: list[EntrySpec] | None) -> ExtractReport:
    t0 = time.perf_counter()
    specs = specs or entry_specs(ds, encoder, cfg)
    kind = choose_loaders(cfg, encoder, device)
    prepare = BatchPreparer(encoder, ds, cfg.skip_bad, device)
    hunger = Hunger()
    loader = None
    early: dict[range, Any] = {}
    if not any(store.entry_exists(s.key) for s in specs):
        # a new entry: shard 0 is pending unless another worker takes it first, so its first batches load
        # while the entry is created (~0.1 s of zarr calls); dropped unused if shard 0 goes elsewhere
        loader = make_loader(kind, prepare, cfg, hunger)
        first = batches(0, min(specs[0].rows, cfg.shard_rows), cfg.batch_size)[:max(1, cfg.prefetch_batches)]
        early = {rows: loader.submit(rows) for rows in first}
    try:
        entries = [store.create_entry(spec) for spec in specs]
        report = ExtractReport(encoder=encoder.spec, entries=[e.key for e in entries],
                               shards_total=entries[0].spec.n_shards, torch_threads=n_threads, loaders=kind)
        pending = pending_union(entries)
        if not pending:
            report.wall_s = time.perf_counter() - t0
            return report
        loader = loader or make_loader(kind, prepare, cfg, hunger)
        worker = ShardEncoder(encoder, ds, entries, cfg, device, prepare)
        try:
            return ShardPipeline(report, entries, worker, loader, early, hunger, cfg, on_shard).run(pending, t0)
        finally:
            report.batches_stolen = loader.stolen
    finally:
        for handle in early.values():
            handle.drop()
        if loader is not None:
            loader.close()


def extract_local(store: FeatureStore, dataset: str, cfg: ExtractConfig,
                  load: Callable[[str, str], Any] | None = None) -> list[ExtractReport]:
    """Extract every encoder of the config over a stored dataset with the local engine."""
    if not cfg.encoders:
        raise StratalignError("name at least one --encoder")
    if load is None:
        from stratalign.encoders import load_encoder as load
    ds = store.dataset(dataset)
    device = resolve_device(cfg.device)
    start_loader_processes(cfg, device)  # forked before any model is loaded (see image_loaders.py)
    reports = []
    for spec in cfg.encoders:
        encoder = load(spec, str(device))
        specs = plan_encoder(store, ds, encoder, cfg, str(device))
        reports.append(extract_encoder(store, ds, encoder, cfg, device, specs=specs))
    return reports
