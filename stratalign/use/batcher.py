"""Micro-batching for a warm server: concurrent requests that arrive while the model is busy run as one batch.

Each worker thread of a Batcher takes every waiting item (up to `max_batch`), calls the batch function once and
hands each caller its own result. Under load the encoder then runs once for 16 concurrent queries instead of 16
times behind a lock (a batch of 16 short texts costs ~8 times one); alone, a request waits for nobody. With
`workers` > 1 a second batch is encoded while the first one runs (the function must be thread-safe: onnxruntime
sessions are), so a batch function that releases the GIL keeps that many cores busy.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class Batcher:
    """`batcher(item)` -> fn([item, ...])[i], run in batches by one worker thread (started on first use)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 64, name: str = "batcher",
                 workers: int = 1) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.name = name
        self.workers = workers
        self._queue: queue.SimpleQueue[tuple[Any, Future]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start = threading.Lock()
        self.batches = 0  # how many calls of fn (tests and benchmarks read it)
        self.sizes: deque[int] = deque(maxlen=1000)  # the last batches' sizes (tests and benchmarks read it)

    def __call__(self, item: Any, timeout: float | None = 60.0) -> Any:
        return self.submit(item).result(timeout)

    def submit(self, item: Any) -> Future:
        """Queue one item; its result (or the batch's error) arrives in the returned future (asyncio code awaits
        it with asyncio.wrap_future, so no thread waits for it)."""
        fut: Future = Future()
        self._queue.put((item, fut))
        if not self._threads:
            with self._start:
                if not self._threads:
                    self._threads = [threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                                     for i in range(self.workers)]
                    for t in self._threads:
                        t.start()
        return fut

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._start:
                self.batches += 1
                self.sizes.append(len(batch))
            try:
                results = self.fn([item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - each caller gets the batch's error
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)
