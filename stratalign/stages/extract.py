"""Stage 1: run each frozen encoder once over a dataset and write every layer's pooled features.

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

import os
import queue
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from stratalign.device import cpu_threads, resolve_device, torch_threads
from stratalign.errors import StratalignError
from stratalign.stages.image_loaders import (
    ProcessImageLoader,
    image_rows_factory,
    loader_pool,
    no_release,
    processes_supported,
    spare_fits,
)
from stratalign.store.claims import Claim, Heartbeat
from stratalign.store.datasets import PairDataset
from stratalign.store.features import DEFAULT_SHARD_ROWS, EntrySpec, FeatureEntry, FeatureStore
from stratalign.store.media import load_image_or_blank

LOADER_KINDS = ("auto", "processes", "threads")


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract; resolved once from the CLI or the caller."""

    encoders: tuple[str, ...]
    poolings: tuple[str, ...] = ()  # empty: each encoder's default pooling; "all": every pooling it supports
    dtype: str = "float16"
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int = 64
    device: str = "auto"
    skip_bad: bool = False
    loaders: str = "auto"  # "processes" | "threads" | "auto": processes for image encoders on CPU (Linux)
    loader_workers: int = 2
    prefetch_batches: int = 4
    poll_s: float = 2.0
    progress: bool = True
    torch_threads: int = 0  # torch intra-op threads; 0: on CPU every CPU available to the process

    def __post_init__(self) -> None:
        if self.loaders not in LOADER_KINDS:
            raise StratalignError(f"unknown loaders {self.loaders!r}: use {', '.join(LOADER_KINDS)}")
        if self.loader_workers < 1:
            raise StratalignError(f"loader workers must be >= 1, got {self.loader_workers}")

    @property
    def slots(self) -> int:
        """Batch slots of loader processes: the loaders' window, the hand-over queue, one batch waiting to be
        queued and one in the model."""
        return max(1, self.prefetch_batches) + 3


@dataclass
class ExtractReport:
    """What one encoder's extraction did: counts and timings (the benchmark reads these)."""

    encoder: str
    entries: list[str]
    shards_total: int
    shards_encoded: int = 0
    rows_encoded: int = 0
    bad_rows: list[int] = field(default_factory=list)
    forward_s: float = 0.0
    wall_s: float = 0.0
    torch_threads: int = 0
    loaders: str = ""
    batches_stolen: int = 0  # batches the loader processes were too slow for, prepared by the loader thread

    @property
    def rows_per_s(self) -> float:
        return self.rows_encoded / self.wall_s if self.wall_s > 0 else 0.0


def resolve_poolings(encoder: Any, requested: tuple[str, ...]) -> tuple[str, ...]:
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
                      dims=tuple(encoder.dims), rows=rows, dtype=cfg.dtype, shard_rows=cfg.shard_rows)
            for pooling in resolve_poolings(encoder, cfg.poolings)]


def plan_entries(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig) -> list[FeatureEntry]:
    """Create (or open) the entries this encoder fills: one per pooling, keyed by content."""
    return [store.create_entry(spec) for spec in entry_specs(ds, encoder, cfg)]


class RowReader:
    """Turns row indices into raw items (PIL images or caption strings) for one modality."""

    def __init__(self, ds: PairDataset, modality: str, skip_bad: bool) -> None:
        self.modality = modality
        self.skip_bad = skip_bad
        if modality == "image":
            self.paths = ds.images["path"].to_list()
            self.shas = ds.images["sha"].to_list()
            self.ids = ds.images["image_id"].to_list()
        else:
            self.texts = ds.captions["text"].to_list()
            self.ids = ds.captions["caption_id"].to_list()

    def read(self, rows: range) -> tuple[list, list[int]]:
        """Items of the rows, and the rows that were bad (replaced by a blank item) under skip_bad."""
        items, bad = [], []
        for r in rows:
            if self.modality == "text":
                text = self.texts[r]
                if not text.strip():
                    if not self.skip_bad:
                        raise StratalignError(f"caption {self.ids[r]} (row {r}) is empty")
                    bad.append(r)
                items.append(text or ".")
                continue
            image, was_bad = load_image_or_blank(self.paths[r], self.shas[r], row=r, image_id=self.ids[r],
                                                 skip_bad=self.skip_bad)
            items.append(image)
            if was_bad:
                bad.append(r)
        return items, bad


STEAL_AFTER_S = 0.25  # the model has waited this long for a loader process's batch: prepare it in-process


def choose_loaders(cfg: ExtractConfig, encoder: Any, device: torch.device) -> str:
    """'processes' or 'threads' for this encoder (see the module docstring); a clear error when the
    requested kind cannot serve it."""
    if cfg.loaders == "threads":
        return "threads"
    transform = getattr(encoder, "image_transform", None)
    why = None
    if transform is None:
        why = f"{encoder.spec} has no plain image transform (text encoders and custom preprocessing use threads)"
    elif not processes_supported():
        why = "loader processes need Linux (fork)"
    elif not spare_fits(cfg.slots, (cfg.batch_size, 3, transform.crop, transform.crop)):
        why = "/dev/shm has too little free space for the batch slots (lower --batch-size)"
    elif cfg.loaders == "auto" and device.type != "cpu":
        return "threads"  # the CPUs are free while a GPU computes
    if why is None:
        return "processes"
    if cfg.loaders == "processes":
        raise StratalignError(f"--loaders processes: {why}")
    return "threads"


class Hunger:
    """Set while the model thread waits for a batch: how long it has waited."""

    def __init__(self) -> None:
        self.since: float | None = None

    def waited(self) -> float:
        since = self.since
        return 0.0 if since is None else time.monotonic() - since


class ThreadLoader:
    """Loader threads: `submit(rows)` returns a handle whose `result()` gives (rows, batch, bad, release)."""

    def __init__(self, prepare: "BatchPreparer", n: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="stratalign-load")
        self.prepare = prepare
        self.stolen = 0

    def submit(self, rows: range) -> Any:
        fut = self.pool.submit(self.prepare, rows)
        return _Later(lambda: (*fut.result(), no_release), fut.cancel)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Later:
    def __init__(self, get: Callable[[], tuple], drop: Callable[[], Any]) -> None:
        self.result, self.drop = get, drop


def start_loader_processes(cfg: ExtractConfig, device: torch.device) -> None:
    """Fork the loader processes now if extraction may use them; a no-op when they run already."""
    if cfg.loaders != "threads" and (device.type == "cpu" or cfg.loaders == "processes") and processes_supported():
        loader_pool(cfg.loader_workers)


def make_loader(kind: str, prepare: "BatchPreparer", cfg: ExtractConfig, hunger: Hunger) -> Any:
    if kind == "threads":
        return ThreadLoader(prepare, cfg.loader_workers)
    reader = prepare.reader
    return ProcessImageLoader(loader_pool(cfg.loader_workers), prepare.encoder.image_transform,
                              image_rows_factory(reader.paths, reader.shas, reader.ids, cfg.skip_bad),
                              cfg.batch_size, cfg.slots, prepare,
                              lambda: hunger.waited() > STEAL_AFTER_S)


def _batches(start: int, stop: int, size: int) -> list[range]:
    return [range(s, min(s + size, stop)) for s in range(start, stop, size)]


class BatchPreparer:
    """Rows -> (rows, model-ready batch, bad rows), in the calling thread (a loader thread, or the thread
    that waits on a loader process that is late)."""

    def __init__(self, encoder: Any, ds: PairDataset, skip_bad: bool, device: torch.device) -> None:
        self.encoder = encoder
        self.device = device
        self.reader = RowReader(ds, encoder.modality, skip_bad)

    def __call__(self, rows: range) -> tuple[range, dict[str, torch.Tensor], list[int]]:
        items, bad = self.reader.read(rows)
        batch = self.encoder.preprocess(items)
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return rows, batch, bad


class ShardEncoder:
    """Encodes whole shards with one loaded model: the unit of work of both engines."""

    def __init__(self, encoder: Any, ds: PairDataset, entries: list[FeatureEntry], cfg: ExtractConfig,
                 device: torch.device, prepare: BatchPreparer | None = None) -> None:
        self.encoder = encoder
        self.entries = entries
        self.cfg = cfg
        self.device = device
        self.prepare = prepare or BatchPreparer(encoder, ds, cfg.skip_bad, device)
        self.poolings = [e.spec.pooling for e in entries]
        self.forward_s = 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, list[np.ndarray]]:
        """One forward pass; only the pooled float32 vectors leave the device."""
        t0 = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                pooled = self.encoder.forward_pooled(batch, self.poolings)
        else:
            pooled = self.encoder.forward_pooled(batch, self.poolings)
        # np.array(copy=True): a pooled vector may be a view into a whole hidden state (cls = h[:, 0]);
        # holding the view until the shard is written would keep every layer's full activations alive.
        out = {p: [np.array(t.detach().float().cpu().numpy(), copy=True) for t in layers]
               for p, layers in pooled.items()}
        self.forward_s += time.perf_counter() - t0
        return out

    def encode_shard(self, shard: int) -> tuple[dict[str, list[np.ndarray]], list[int]]:
        """All layers of one shard for every pooling (no prefetching: used by the Ray engine)."""
        start, stop = self.entries[0].shard_rows_range(shard)
        parts: dict[str, list[list[np.ndarray]]] = {p: [] for p in self.poolings}
        bad_rows: list[int] = []
        for rows in _batches(start, stop, self.cfg.batch_size):
            _, batch, bad = self.prepare(rows)
            bad_rows += bad
            for p, layers in self.forward(batch).items():
                parts[p].append(layers)
        return {p: [np.concatenate(c) for c in zip(*chunks)] for p, chunks in parts.items()}, bad_rows

    def write(self, shard: int, blocks: dict[str, list[np.ndarray]], bad_rows: list[int]) -> None:
        info = {"bad_rows": bad_rows, "host": socket.gethostname(), "pid": os.getpid()}
        for entry in self.entries:
            if not entry.store.loc.exists(*entry.folder, "_shards", f"{shard}.json"):
                try:
                    entry.write_shard(shard, blocks[entry.spec.pooling], info)
                except OSError as exc:
                    raise StratalignError(
                        f"cannot write shard {shard} of {entry.key} to {entry.store.url}: {exc}; "
                        "finished shards are kept, rerun to resume"
                    ) from None


def pending_union(entries: list[FeatureEntry]) -> list[int]:
    return sorted(set().union(*(e.pending_shards() for e in entries)))


def extraction_threads(cfg: ExtractConfig, device: torch.device) -> int:
    """torch intra-op threads for extraction: `cfg.torch_threads` when set; on CPU every CPU available to
    the process (affinity mask and container quota, where torch's own default counts the host's cores);
    on a GPU torch's current setting. No CPU is held back for the loader threads: decoding and resizing a
    batch costs a few percent of its forward pass (measured in benchmarks/extract.py), and one torch thread
    fewer would cost half the forward speed on a 2-core machine."""
    if cfg.torch_threads or device.type == "cpu":
        return cpu_threads(cfg.torch_threads)
    return torch.get_num_threads()


def release_all(entries: list[FeatureEntry], shard: int, claim: Claim, heartbeat: Heartbeat | None = None) -> None:
    """Drop our claim on a shard in every entry (others' claims are left alone)."""
    for e in entries:
        if heartbeat is not None:
            heartbeat.release(e.store.loc, e.claims_folder, shard)
        else:
            e.release(shard, claim)


def _claim_all(entries: list[FeatureEntry], shard: int, claim: Claim, heartbeat: Heartbeat | None = None) -> bool:
    """Claim a shard in every entry that still lacks it, or in none (release on partial success).

    The markers are checked again after the claims are won: another worker may have written its marker
    and released its claim between our first check and our exclusive create, and the shard is then done."""
    got = []
    for e in entries:
        if e.shard_done(shard):
            continue
        if not e.claim(shard, claim):
            release_all(got, shard, claim, heartbeat)
            return False
        got.append(e)
        if heartbeat is not None:
            heartbeat.hold(e.store.loc, e.claims_folder, shard)
    done = [e for e in got if e.shard_done(shard, refresh=True)]
    release_all(done, shard, claim, heartbeat)
    return len(done) < len(got)


def _claimed_shards(entries: list[FeatureEntry], claim: Claim, poll_s: float,
                    in_flight: set[int], stop: threading.Event, heartbeat: Heartbeat | None = None) -> Iterator[int]:
    """Yield shards this worker now owns until none is pending; wait while others hold the rest."""
    while not stop.is_set():
        pending = [s for s in pending_union(entries) if s not in in_flight]
        if not pending:
            return
        took = False
        for s in pending:
            if stop.is_set():
                return
            if _claim_all(entries, s, claim, heartbeat):
                took = True
                in_flight.add(s)
                yield s
        if not took:
            time.sleep(poll_s)  # the rest is held by live workers: wait for them or for their lease to lapse


def extract_encoder(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig,
                    device: torch.device | None = None,
                    on_shard: Callable[[int], None] | None = None) -> ExtractReport:
    """Fill this encoder's entries for the dataset with the local engine (resumable, concurrent-safe)."""
    device = device or resolve_device(cfg.device)
    with torch_threads(extraction_threads(cfg, device)) as n_threads:
        return _extract_encoder(store, ds, encoder, cfg, device, on_shard, n_threads)


def _extract_encoder(store: FeatureStore, ds: PairDataset, encoder: Any, cfg: ExtractConfig, device: torch.device,
                     on_shard: Callable[[int], None] | None, n_threads: int) -> ExtractReport:
    t0 = time.perf_counter()
    specs = entry_specs(ds, encoder, cfg)
    kind = choose_loaders(cfg, encoder, device)
    prepare = BatchPreparer(encoder, ds, cfg.skip_bad, device)
    hunger = Hunger()
    loader = None
    early: dict[range, Any] = {}
    if not any(store.loc.exists("features", s.key, "zarr.json") for s in specs):
        # a new entry: shard 0 is pending unless another worker takes it first, so its first batches load
        # while the entry is created (~0.1 s of zarr calls); dropped unused if shard 0 goes elsewhere
        loader = make_loader(kind, prepare, cfg, hunger)
        first = _batches(0, min(specs[0].rows, cfg.shard_rows), cfg.batch_size)[:max(1, cfg.prefetch_batches)]
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
            return _run(report, entries, worker, loader, early, hunger, cfg, pending, on_shard, t0)
        finally:
            report.batches_stolen = loader.stolen
    finally:
        for handle in early.values():
            handle.drop()
        if loader is not None:
            loader.close()


def _run(report: ExtractReport, entries: list[FeatureEntry], worker: ShardEncoder, loader: Any,
         early: dict[range, Any], hunger: Hunger, cfg: ExtractConfig, pending: list[int],
         on_shard: Callable[[int], None] | None, t0: float) -> ExtractReport:
    """The claim/load/forward/write loop over this worker's shards; `early` holds batches already submitted."""
    claim = Claim.mine()
    heartbeat = Heartbeat(claim)
    rows_pending = sum(len(range(*entries[0].shard_rows_range(s))) for s in pending)
    bar = tqdm(total=rows_pending, unit="row", desc=f"extract {worker.encoder.spec}", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)

    ahead = max(1, cfg.prefetch_batches)
    prepared: queue.Queue = queue.Queue(maxsize=1)  # the loaders' window already runs `ahead` batches ahead
    to_write: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    in_flight: set[int] = set()
    errors: list[BaseException] = []
    END = object()

    def produce() -> None:
        window: deque = deque()
        try:
            for shard in _claimed_shards(entries, claim, cfg.poll_s, in_flight, stop, heartbeat):
                if shard != 0:  # another worker has shard 0: its early batches only hold memory
                    for handle in early.values():
                        handle.drop()
                    early.clear()
                start, end = entries[0].shard_rows_range(shard)
                batches = list(_batches(start, end, cfg.batch_size))
                # A sliding window of prefetch_batches batches in the loaders: memory stays a few batches
                # whatever the shard size (submitting a whole shard held every preprocessed image at once).
                def submit(rows: range) -> Any:
                    return early.pop(rows, None) or loader.submit(rows)

                window.extend(submit(rows) for rows in batches[:ahead])
                for i in range(len(batches)):
                    handle = window.popleft()
                    if i + ahead < len(batches):
                        window.append(submit(batches[i + ahead]))
                    item = (shard, i == len(batches) - 1, *handle.result())
                    while not stop.is_set():
                        try:
                            prepared.put(item, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        item[-1]()
                        return
        except BaseException as exc:  # handed to the main thread
            prepared.put(exc)
        finally:
            for handle in window:
                handle.drop()
            prepared.put(END)

    def write() -> None:
        try:
            for entry in entries:
                entry.open_arrays()  # while the first shard is encoded, not after it
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        while True:
            job = to_write.get()
            if job is END:
                return
            shard, blocks, bad = job
            try:
                worker.write(shard, blocks, bad)
                if on_shard:
                    on_shard(shard)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                release_all(entries, shard, claim, heartbeat)
                in_flight.discard(shard)

    producer = threading.Thread(target=produce, name="stratalign-loader", daemon=True)
    writer = threading.Thread(target=write, name="stratalign-writer", daemon=True)
    heartbeat.start()
    producer.start()
    writer.start()
    parts: dict[str, list[list[np.ndarray]]] = {p: [] for p in worker.poolings}
    shard_bad: list[int] = []
    try:
        while True:
            try:
                item = prepared.get_nowait()
            except queue.Empty:
                hunger.since = time.monotonic()
                item = prepared.get()
                hunger.since = None
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
            if errors:
                raise errors[0]
            shard, last, rows, batch, bad, release = item
            shard_bad += bad
            try:
                for p, layers in worker.forward(batch).items():
                    parts[p].append(layers)
            finally:
                del batch
                release()
            bar.update(len(rows))
            if last:
                blocks = {p: [np.concatenate(c) for c in zip(*chunks)] for p, chunks in parts.items()}
                to_write.put((shard, blocks, shard_bad))
                report.shards_encoded += 1
                report.rows_encoded += len(range(*entries[0].shard_rows_range(shard)))
                report.bad_rows += shard_bad
                parts = {p: [] for p in worker.poolings}
                shard_bad = []
    finally:
        stop.set()
        to_write.put(END)
        writer.join()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                prepared.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()
        for s in list(in_flight):
            release_all(entries, s, claim, heartbeat)
        heartbeat.stop()
        bar.close()
    if errors:
        raise errors[0]
    report.forward_s = worker.forward_s
    report.wall_s = time.perf_counter() - t0
    return report


def extract(store: FeatureStore, dataset: str, cfg: ExtractConfig,
            load: Callable[[str, str], Any] | None = None) -> list[ExtractReport]:
    """Extract every encoder of the config over a stored dataset (local engine)."""
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
        reports.append(extract_encoder(store, ds, encoder, cfg, device))
        if encoder.modality == "text" and ds.class_names:
            from stratalign.stages.prompts import class_prompts, prompt_features

            for entry in plan_entries(store, ds, encoder, cfg):  # zero-shot prompts, cached for eval
                prompt_features(entry, class_prompts(ds)[2], device=str(device), load=lambda *_, e=encoder: e)
    return reports
