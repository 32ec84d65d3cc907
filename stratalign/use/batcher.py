"""Micro-batching for a warm server: concurrent requests that arrive while the model is busy run as one batch.

One worker thread per Batcher takes every waiting item (up to `max_batch`), calls the batch function once and
hands each caller its own result. Under load the encoder then runs once for 16 concurrent queries instead of 16
times behind a lock (on 2 CPU cores a batch of 16 short texts costs little more than one); alone, a request
waits for nobody.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class Batcher:
    """`batcher(item)` -> fn([item, ...])[i], run in batches by one worker thread (started on first use)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 64, name: str = "batcher") -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Any, Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.batches = 0  # how many calls of fn (tests and benchmarks read it)

    def __call__(self, item: Any, timeout: float | None = 60.0) -> Any:
        fut: Future = Future()
        self._queue.put((item, fut))
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                    self._thread.start()
        return fut.result(timeout)

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.batches += 1
            try:
                results = self.fn([item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - each caller gets the batch's error
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)
