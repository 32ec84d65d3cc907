"""Stage 1: run each frozen encoder once over a dataset and write every layer's pooled features.

Work is cut into store shards (`shard_rows` rows each). A worker claims a shard (see stores.claims),
loads and preprocesses its rows in background threads while the model runs, pools every layer in one
forward pass, and hands the shard's blocks to a background writer that writes all layers and then the
completion marker. A heartbeat thread keeps the claims fresh meanwhile, and a claim won just after another
worker finished the shard is dropped again. On CPU, torch gets the CPUs available to the process.
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

from stratalign.errors import StratalignError
from stratalign.pipeline.device import cpu_threads, resolve_device, torch_threads
from stratalign.stores.claims import Claim, Heartbeat
from stratalign.stores.feature_store import DEFAULT_SHARD_ROWS, EntrySpec, FeatureEntry, FeatureStore
from stratalign.stores.media import BadItem, load_image
from stratalign.stores.pairs import PairDataset


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
    loader_threads: int = 2
    prefetch_batches: int = 4
    poll_s: float = 2.0
    progress: bool = True
    torch_threads: int = 0  # torch intra-op threads; 0: on CPU every CPU available to the process


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
            try:
                items.append(load_image(self.paths[r], self.shas[r], row=r, image_id=self.ids[r]))
            except BadItem:
                if not self.skip_bad:
                    raise
                from PIL import Image

                bad.append(r)
                items.append(Image.new("RGB", (32, 32), (255, 255, 255)))
        return items, bad


def _batches(start: int, stop: int, size: int) -> list[range]:
    return [range(s, min(s + size, stop)) for s in range(start, stop, size)]


class ShardEncoder:
    """Encodes whole shards with one loaded model: the unit of work of both engines."""

    def __init__(self, encoder: Any, ds: PairDataset, entries: list[FeatureEntry], cfg: ExtractConfig,
                 device: torch.device) -> None:
        self.encoder = encoder
        self.entries = entries
        self.cfg = cfg
        self.device = device
        self.reader = RowReader(ds, encoder.modality, cfg.skip_bad)
        self.poolings = [e.spec.pooling for e in entries]
        self.forward_s = 0.0

    def prepare(self, rows: range) -> tuple[range, dict[str, torch.Tensor], list[int]]:
        """Load and preprocess one batch (runs in loader threads)."""
        items, bad = self.reader.read(rows)
        batch = self.encoder.preprocess(items)
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return rows, batch, bad

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
    entries = plan_entries(store, ds, encoder, cfg)
    report = ExtractReport(encoder=encoder.spec, entries=[e.key for e in entries],
                           shards_total=entries[0].spec.n_shards, torch_threads=n_threads)
    pending = pending_union(entries)
    if not pending:
        report.wall_s = time.perf_counter() - t0
        return report
    worker = ShardEncoder(encoder, ds, entries, cfg, device)
    claim = Claim.mine()
    heartbeat = Heartbeat(claim)
    rows_pending = sum(len(range(*entries[0].shard_rows_range(s))) for s in pending)
    bar = tqdm(total=rows_pending, unit="row", desc=f"extract {encoder.spec}", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)

    ahead = max(1, cfg.prefetch_batches)
    prepared: queue.Queue = queue.Queue(maxsize=ahead)
    to_write: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    in_flight: set[int] = set()
    errors: list[BaseException] = []
    END = object()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=cfg.loader_threads) as pool:
                for shard in _claimed_shards(entries, claim, cfg.poll_s, in_flight, stop, heartbeat):
                    start, end = entries[0].shard_rows_range(shard)
                    batches = list(_batches(start, end, cfg.batch_size))
                    # A sliding window of prefetch_batches batches in the loaders: memory stays a few batches
                    # whatever the shard size (submitting a whole shard held every preprocessed image at once).
                    window = deque(pool.submit(worker.prepare, rows) for rows in batches[:ahead])
                    for i in range(len(batches)):
                        fut = window.popleft()
                        if i + ahead < len(batches):
                            window.append(pool.submit(worker.prepare, batches[i + ahead]))
                        item = (shard, i == len(batches) - 1, *fut.result())
                        while not stop.is_set():
                            try:
                                prepared.put(item, timeout=0.5)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
        except BaseException as exc:  # handed to the main thread
            prepared.put(exc)
        finally:
            prepared.put(END)

    def write() -> None:
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
            item = prepared.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
            if errors:
                raise errors[0]
            shard, last, rows, batch, bad = item
            shard_bad += bad
            for p, layers in worker.forward(batch).items():
                parts[p].append(layers)
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
        from stratalign.pipeline.encoders import load_encoder as load
    ds = store.dataset(dataset)
    device = resolve_device(cfg.device)
    reports = []
    for spec in cfg.encoders:
        encoder = load(spec, str(device))
        reports.append(extract_encoder(store, ds, encoder, cfg, device))
        if encoder.modality == "text" and ds.class_names:
            from stratalign.pipeline.prompts import class_prompts, prompt_features

            for entry in plan_entries(store, ds, encoder, cfg):  # zero-shot prompts, cached for eval
                prompt_features(entry, class_prompts(ds)[2], device=str(device), load=lambda *_, e=encoder: e)
    return reports
