"""Stage 1 beyond one machine: one Ray task per store shard, the model held by actors.

The store is the interface: every actor opens the same store URL (a shared path or an s3:// bucket),
claims a shard with the same protocol as the local engine, encodes it with the same ShardEncoder and
writes it, so Ray and local runs produce identical bytes and may even run side by side.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from stratalign.errors import StratalignError
from stratalign.pipeline.device import resolve_device
from stratalign.pipeline.extract import (
    ExtractConfig,
    ExtractReport,
    ShardEncoder,
    _claim_all,
    pending_union,
    plan_entries,
)
from stratalign.stores.claims import Claim
from stratalign.stores.feature_store import FeatureStore


class ShardWorker:
    """Body of the Ray actor: holds one loaded encoder, encodes and writes whole shards on request."""

    def __init__(self, store_url: str, dataset: str, spec: str, cfg: ExtractConfig,
                 load: Callable[[str, str], Any] | None = None) -> None:
        if load is None:
            from stratalign.pipeline.encoders import load_encoder as load
        self.store = FeatureStore.open(store_url, "a")
        ds = self.store.dataset(dataset)
        device = resolve_device(cfg.device)
        encoder = load(spec, str(device))
        self.entries = plan_entries(self.store, ds, encoder, cfg)
        self.worker = ShardEncoder(encoder, ds, self.entries, cfg, device)
        self.claim = Claim.mine()

    def encode(self, shard: int) -> dict[str, Any]:
        """Encode and write one shard if we can claim it; report what happened."""
        if not _claim_all(self.entries, shard, self.claim):
            return {"shard": shard, "encoded": False}
        try:
            t0 = time.perf_counter()
            blocks, bad = self.worker.encode_shard(shard)
            self.worker.write(shard, blocks, bad)
            start, stop = self.entries[0].shard_rows_range(shard)
            return {"shard": shard, "encoded": True, "rows": stop - start, "bad_rows": bad,
                    "seconds": time.perf_counter() - t0, "pid": os.getpid()}
        finally:
            for e in self.entries:
                e.release(shard, self.claim)


def extract_ray(store: FeatureStore, dataset: str, cfg: ExtractConfig, *, address: str | None = None,
                actors: int | None = None, load: Callable[[str, str], Any] | None = None) -> list[ExtractReport]:
    """Extract with Ray: actors hold the model (a GPU each when the cluster has them), one task per shard."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise StratalignError("--engine ray needs the 'ray' extra: pip install 'stratalign[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        Actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(ShardWorker)
        ds = store.dataset(dataset)
        reports = []
        for spec in cfg.encoders:
            t0 = time.perf_counter()
            if load is None:
                from stratalign.pipeline.encoders import load_encoder as load_fn
            else:
                load_fn = load
            entries = plan_entries(store, ds, load_fn(spec, "cpu"), cfg)  # creates entries once, up front
            report = ExtractReport(encoder=spec, entries=[e.key for e in entries],
                                   shards_total=entries[0].spec.n_shards)
            pending = pending_union(entries)
            while pending:
                n = actors or (gpus if gpus else max(1, cpus // 2))
                pool = ActorPool([Actor.remote(store.url, dataset, spec, cfg, load)
                                  for _ in range(min(n, len(pending)))])
                for result in pool.map_unordered(lambda a, s: a.encode.remote(s), pending):
                    if result["encoded"]:
                        report.shards_encoded += 1
                        report.rows_encoded += result["rows"]
                        report.bad_rows += result["bad_rows"]
                        report.forward_s += result["seconds"]
                left = pending_union(entries)
                if left and left == pending:
                    time.sleep(cfg.poll_s)  # other workers hold these shards: wait for them
                pending = left
            report.bad_rows.sort()
            report.wall_s = time.perf_counter() - t0
            reports.append(report)
        return reports
    finally:
        if started:
            ray.shutdown()
