"""Stage 1 beyond one machine: one Ray task per store shard, the model held by actors.

The store is the interface: every actor opens the same store URL (a shared path or an s3:// bucket),
claims a shard with the same protocol as the local engine (heartbeat included), encodes it with the same
ShardEncoder and writes it, so Ray and local runs produce identical bytes and may even run side by side.

The driver plans the entries (and caches a text encoder's zero-shot prompts, as the local engine does);
each actor loads its own copy of the encoder and must arrive at the very same entry keys (same weights,
preprocessing and layers), or it refuses to start with a one-line error naming the metadata that differs.
Each actor runs torch with as many threads as the CPUs Ray gave it.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from typing import Any, Callable

import torch

from stratalign.device import cpu_threads, resolve_device
from stratalign.errors import StratalignError, preview
from stratalign.progress import progress_bar
from stratalign.stages.extract.config import ExtractConfig, ExtractReport
from stratalign.stages.extract.plan import entry_specs, plan_encoder
from stratalign.stages.extract.shards import ClaimWait, ShardEncoder, claim_all, pending_union, release_all, say_stderr
from stratalign.store.claims import Claim, Heartbeat
from stratalign.store.feature_store import EntrySpec, FeatureEntry, FeatureStore

IDLE_ROUNDS = 3  # rounds in a row with unclaimed pending shards and no progress before giving up


def spec_differences(mine: EntrySpec, theirs: dict[str, Any]) -> list[str]:
    """The identity fields (encoder metadata fields as `encoder.<name>`) where two entry specs differ."""
    a = mine.identity()
    diff = []
    for k in sorted(set(a) | set(theirs)):
        if a.get(k) == theirs.get(k):
            continue
        if k == "encoder" and isinstance(a.get(k), dict) and isinstance(theirs.get(k), dict):
            ea, eb = a[k], theirs[k]
            diff += [f"encoder.{f}" for f in sorted(set(ea) | set(eb)) if ea.get(f) != eb.get(f)]
        else:
            diff.append(k)
    return diff


def check_same_entries(spec: str, mine: list[EntrySpec], expected: list[dict[str, Any]]) -> None:
    """Raise a one-line error unless this worker's planned entries are exactly the driver's."""
    keys = [s.key for s in mine]
    theirs = [EntrySpec.from_json(e).key for e in expected]
    if keys == theirs:
        return
    diff = sorted({d for s, e in zip(mine, expected) for d in spec_differences(s, e)}) or ["the pooling list"]
    raise StratalignError(
        f"{spec} on {socket.gethostname()} plans entries {preview(keys, 3)} but the driver planned "
        f"{preview(theirs, 3)}: {', '.join(diff)} differ between machines; install the same weights and "
        "library versions everywhere"
    )


def _assigned_cpus() -> int | None:
    """The CPUs Ray gave the current actor, or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not inside a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


class ShardWorker:
    """Body of the Ray actor: holds one loaded encoder, encodes and writes whole shards on request.

    A failure while starting is kept and raised by the first `encode` call, so the driver gets the
    original exception (Ray's actor-death error would carry only its formatted traceback)."""

    def __init__(self, store_url: str, dataset: str, spec: str, cfg: ExtractConfig,
                 load: Callable[[str, str], Any] | None = None,
                 expected: list[dict[str, Any]] | None = None) -> None:
        self.init_error: BaseException | None = None
        try:
            self._start(store_url, dataset, spec, cfg, load, expected)
        except Exception as exc:  # noqa: BLE001 - re-raised by encode()
            self.init_error = exc

    def _start(self, store_url: str, dataset: str, spec: str, cfg: ExtractConfig,
               load: Callable[[str, str], Any] | None, expected: list[dict[str, Any]] | None) -> None:
        if load is None:
            from stratalign.encoders import load_encoder as load
        self.threads = _assigned_cpus() or cpu_threads(cfg.torch_threads)
        torch.set_num_threads(self.threads)  # this process is the actor's alone
        self.store = FeatureStore.open(store_url, "a")
        ds = self.store.dataset(dataset)
        device = resolve_device(cfg.device)
        encoder = load(spec, str(device))
        specs = entry_specs(ds, encoder, cfg)
        if expected is not None:
            check_same_entries(spec, specs, expected)
        self.entries: list[FeatureEntry] = [self.store.create_entry(s) for s in specs]
        self.worker = ShardEncoder(encoder, ds, self.entries, cfg, device)
        self.claim = Claim.mine()
        self.heartbeat = Heartbeat(self.claim).start()

    def encode(self, shard: int) -> dict[str, Any]:
        """Encode and write one shard if we can claim it; report what happened."""
        if self.init_error is not None:
            raise self.init_error
        if not claim_all(self.entries, shard, self.claim, self.heartbeat):
            return {"shard": shard, "encoded": False}
        try:
            t0 = time.perf_counter()
            blocks, bad = self.worker.encode_shard(shard)
            self.worker.write(shard, blocks, bad)
            start, stop = self.entries[0].shard_rows_range(shard)
            return {"shard": shard, "encoded": True, "rows": stop - start, "bad_rows": bad,
                    "seconds": time.perf_counter() - t0, "pid": os.getpid(), "threads": torch.get_num_threads()}
        finally:
            release_all(self.entries, shard, self.claim, self.heartbeat)

    def close(self) -> None:
        """Stop the heartbeat thread (Ray actors are simply killed)."""
        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()


_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ray_error(exc: BaseException, spec: str) -> StratalignError:
    """One line for a failed Ray task or actor: the underlying error's message, not Ray's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, StratalignError):
        return StratalignError(str(cause))
    if isinstance(cause, BaseException):
        first = (str(cause).strip().splitlines() or [""])[0]
        return StratalignError(f"a Ray actor failed extracting {spec}: {type(cause).__name__}: {first}")
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    found = [m for m in map(_EXC_LINE.match, lines) if m]
    if found and found[-1].group(1) == "StratalignError":
        return StratalignError(found[-1].group(2))
    what = f"{found[-1].group(1)}: {found[-1].group(2)}" if found else (lines[0] if lines else type(exc).__name__)
    return StratalignError(f"a Ray actor died extracting {spec}: {what}")


def _actor_cpus(ray: Any, n_actors: int, gpus: int, cpus: int, cfg: ExtractConfig) -> int:
    """CPUs per actor: cfg.torch_threads when set (at most one node's CPUs, or it could never be placed);
    1 beside a GPU; on a CPU-only cluster an equal share that still lets every actor be placed (each node
    fits its share of the actors)."""
    nodes = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    nodes = [c for c in nodes if c > 0] or [cpus]
    if cfg.torch_threads:
        return max(1, min(cfg.torch_threads, max(nodes)))
    if gpus:
        return 1
    per_node = math.ceil(n_actors / len(nodes))
    return max(1, min(cpus // n_actors, min(nodes) // per_node))


def _unclaimed(entries: list[FeatureEntry], shards: list[int]) -> list[int]:
    """Pending shards that some entry lacks and nobody holds a claim on."""
    out = []
    for s in shards:
        for e in entries:
            if not e.shard_done(s) and not e.has_claim(s):
                out.append(s)
                break
    return out


def extract_ray(store: FeatureStore, dataset: str, cfg: ExtractConfig, *, address: str | None = None,
                actors: int | None = None, load: Callable[[str, str], Any] | None = None) -> list[ExtractReport]:
    """Extract with Ray: actors hold the model (a GPU each when the cluster has them), one task per shard."""
    try:
        import ray
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
        if load is None:
            from stratalign.encoders import load_encoder as load_fn
        else:
            load_fn = load
        reports = []
        for spec in cfg.encoders:
            t0 = time.perf_counter()
            encoder = load_fn(spec, "cpu")
            specs = plan_encoder(store, ds, encoder, cfg, "cpu")  # the zero-shot prompts too, as the local engine
            entries = [store.create_entry(s) for s in specs]  # creates entries once, up front
            del encoder
            report = ExtractReport(encoder=spec, entries=[e.key for e in entries],
                                   shards_total=entries[0].spec.n_shards)
            pending = pending_union(entries)
            if pending:
                n = min(actors or (gpus if gpus else max(1, cpus // 2)), len(pending))
                report.torch_threads = _actor_cpus(ray, n, gpus, cpus, cfg)
                expected = [e.spec.identity() for e in entries]
                handles = [Actor.options(num_cpus=report.torch_threads).remote(store.url, dataset, spec, cfg, load,
                                                                               expected) for _ in range(n)]
                try:
                    _run_shards(handles, entries, pending, report, store.url, cfg)
                finally:
                    for h in handles:
                        ray.kill(h)
                report.bad_rows.sort()
            report.wall_s = time.perf_counter() - t0
            reports.append(report)
        return reports
    finally:
        if started:
            ray.shutdown()


def _run_shards(handles: list[Any], entries: list[FeatureEntry], pending: list[int], report: ExtractReport,
                store_url: str, cfg: ExtractConfig) -> None:
    """One task per pending shard over the actors, in rounds until every entry is complete; gives up with a
    one-line error when free shards make no progress for IDLE_ROUNDS rounds."""
    from ray.exceptions import RayError
    from ray.util import ActorPool

    spec = report.encoder
    pool = ActorPool(handles)
    rows = sum(len(range(*entries[0].shard_rows_range(s))) for s in pending)
    bar = progress_bar(total=rows, unit="row", desc=f"extract {spec} (ray x{len(handles)})", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)
    idle = 0
    waiting = ClaimWait(cfg.poll_s, cfg.claim_wait_s, say_stderr)
    try:
        while pending:
            progressed = False
            try:
                for result in pool.map_unordered(lambda a, s: a.encode.remote(s), pending):
                    if result["encoded"]:
                        progressed = True
                        report.shards_encoded += 1
                        report.rows_encoded += result["rows"]
                        report.bad_rows += result["bad_rows"]
                        report.forward_s += result["seconds"]
                        bar.update(result["rows"])
            except RayError as exc:
                raise ray_error(exc, spec) from None
            left = pending_union(entries)
            if progressed or left != pending:
                idle = 0
                waiting.progress()
            elif _unclaimed(entries, left):
                idle += 1  # free shards that no actor could take: nothing will change by waiting
                if idle >= IDLE_ROUNDS:
                    raise StratalignError(
                        f"extract {spec}: no progress on shards {preview(_unclaimed(entries, left))} of "
                        f"{entries[0].key} after {idle} rounds although nobody holds them; check that "
                        f"{store_url} is writable from every Ray node"
                    )
                time.sleep(cfg.poll_s)
            else:
                idle = 0
                waiting.wait(entries, left)  # other workers hold these shards: say who, until when; poll
            pending = left
    finally:
        bar.close()
