"""The local engine's overlapped loop over this worker's shards: reading, encoding and writing at once.

Three threads share the work. The producer claims shards (in every entry of the encoder, see
extract_shards) and hands their batches over in order, the loaders preparing `prefetch_batches` ahead;
the calling thread runs the model on each batch and, at a shard's last batch, queues the shard's blocks;
the writer writes them (every layer, then the completion marker) and drops the shard's claims. A heartbeat
thread keeps the claims fresh meanwhile. The first error of any thread stops the others and is raised.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from stratalign.progress import progress_bar
from stratalign.stages.extract.config import ExtractConfig, ExtractReport
from stratalign.stages.extract.reader import Hunger, batches
from stratalign.stages.extract.shards import ShardEncoder, claimed_shards, release_all
from stratalign.store.claims import Claim, Heartbeat
from stratalign.store.feature_store import FeatureEntry

END = object()  # the producer's and the model thread's last item


class ShardPipeline:
    """One run of the overlapped loop; `early` holds batches of shard 0 already submitted to the loader."""

    def __init__(self, report: ExtractReport, entries: list[FeatureEntry], worker: ShardEncoder, loader: Any,
                 early: dict[range, Any], hunger: Hunger, cfg: ExtractConfig,
                 on_shard: Callable[[int], None] | None) -> None:
        self.report, self.entries, self.worker, self.loader = report, entries, worker, loader
        self.early, self.hunger, self.cfg, self.on_shard = early, hunger, cfg, on_shard
        self.claim = Claim.mine()
        self.heartbeat = Heartbeat(self.claim)
        self.ahead = max(1, cfg.prefetch_batches)
        self.prepared: queue.Queue = queue.Queue(maxsize=1)  # the loaders' window already runs `ahead` batches ahead
        self.to_write: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.in_flight: set[int] = set()
        self.errors: list[BaseException] = []

    def shard_rows(self, shard: int) -> int:
        return len(range(*self.entries[0].shard_rows_range(shard)))

    def run(self, pending: list[int], t0: float) -> ExtractReport:
        """Encode every shard this worker can claim; the report gets its counts and timings."""
        bar = progress_bar(total=sum(self.shard_rows(s) for s in pending), unit="row",
                   desc=f"extract {self.worker.encoder.spec}", disable=not self.cfg.progress,
                   dynamic_ncols=True, smoothing=0.1)
        producer = threading.Thread(target=self.produce, name="stratalign-loader", daemon=True)
        writer = threading.Thread(target=self.write, name="stratalign-writer", daemon=True)
        self.heartbeat.start()
        producer.start()
        writer.start()
        try:
            self.encode(bar)
        finally:
            self.shut_down(producer, writer, bar)
        if self.errors:
            raise self.errors[0]
        self.report.forward_s = self.worker.forward_s
        self.report.wall_s = time.perf_counter() - t0
        return self.report

    # ----- producer thread
    def produce(self) -> None:
        """Claim shards and hand their prepared batches over, in order, until none is left or we stop."""
        window: deque = deque()
        try:
            for shard in claimed_shards(self.entries, self.claim, self.cfg.poll_s, self.in_flight, self.stop,
                                        self.heartbeat, max_wait_s=self.cfg.claim_wait_s):
                if shard != 0:  # another worker has shard 0: its early batches only hold memory
                    for handle in self.early.values():
                        handle.drop()
                    self.early.clear()
                if not self.feed(shard, window):
                    return
        except BaseException as exc:  # handed to the model thread
            self.prepared.put(exc)
        finally:
            for handle in window:
                handle.drop()
            self.prepared.put(END)

    def submit(self, rows: range) -> Any:
        return self.early.pop(rows, None) or self.loader.submit(rows)

    def feed(self, shard: int, window: deque) -> bool:
        """Hand one shard's batches over; False when told to stop. A sliding window of `ahead` batches is in
        the loaders: memory stays a few batches whatever the shard size (submitting a whole shard held every
        preprocessed image at once)."""
        start, end = self.entries[0].shard_rows_range(shard)
        shard_batches = list(batches(start, end, self.cfg.batch_size))
        window.extend(self.submit(rows) for rows in shard_batches[:self.ahead])
        for i in range(len(shard_batches)):
            handle = window.popleft()
            if i + self.ahead < len(shard_batches):
                window.append(self.submit(shard_batches[i + self.ahead]))
            item = (shard, i == len(shard_batches) - 1, *handle.result())
            while not self.stop.is_set():
                try:
                    self.prepared.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set():
                item[-1]()
                return False
        return True

    # ----- model thread (the caller's)
    def next_item(self) -> Any:
        """The next prepared batch; while waiting for it, `hunger` tells the loaders how long."""
        try:
            return self.prepared.get_nowait()
        except queue.Empty:
            self.hunger.since = time.monotonic()
            item = self.prepared.get()
            self.hunger.since = None
            return item

    def encode(self, bar: Any) -> None:
        """Run the model on each batch; queue a shard's blocks for the writer at its last batch."""
        parts: dict[str, list[list[np.ndarray]]] = {p: [] for p in self.worker.poolings}
        shard_bad: list[int] = []
        while True:
            item = self.next_item()
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
            if self.errors:
                raise self.errors[0]
            shard, last, rows, batch, bad, release = item
            shard_bad += bad
            try:
                for p, layers in self.worker.forward(batch).items():
                    parts[p].append(layers)
            finally:
                del batch
                release()
            bar.update(len(rows))
            if last:
                blocks = {p: [np.concatenate(c) for c in zip(*chunks)] for p, chunks in parts.items()}
                self.to_write.put((shard, blocks, shard_bad))
                self.report.shards_encoded += 1
                self.report.rows_encoded += self.shard_rows(shard)
                self.report.bad_rows += shard_bad
                parts = {p: [] for p in self.worker.poolings}
                shard_bad = []

    # ----- writer thread
    def write(self) -> None:
        """Write each finished shard and drop its claims; an error stops the other threads."""
        try:
            for entry in self.entries:
                entry.open_arrays()  # while the first shard is encoded, not after it
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()
        while True:
            job = self.to_write.get()
            if job is END:
                return
            shard, blocks, bad = job
            try:
                self.worker.write(shard, blocks, bad)
                if self.on_shard:
                    self.on_shard(shard)
            except BaseException as exc:
                self.errors.append(exc)
                self.stop.set()
            finally:
                release_all(self.entries, shard, self.claim, self.heartbeat)
                self.in_flight.discard(shard)

    def shut_down(self, producer: threading.Thread, writer: threading.Thread, bar: Any) -> None:
        """Stop and join both threads, drop the claims still held, stop the heartbeat."""
        self.stop.set()
        self.to_write.put(END)
        writer.join()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.prepared.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()
        for s in list(self.in_flight):
            release_all(self.entries, s, self.claim, self.heartbeat)
        self.heartbeat.stop()
        bar.close()
