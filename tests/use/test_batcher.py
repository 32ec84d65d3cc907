"""use.batcher: concurrent calls that arrive while a batch runs are answered by one later batch, each caller
gets its own result, and an error reaches every caller of its batch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stratalign.use.batcher import Batcher


def test_callers_waiting_on_a_busy_worker_share_one_batch() -> None:
    sizes = []
    gate = threading.Event()

    def fn(items):
        sizes.append(len(items))
        if len(sizes) == 1:
            gate.wait(5)  # the first batch holds the worker while the others queue
        return [i * 10 for i in items]

    b = Batcher(fn)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(b, 0)
        time.sleep(0.2)
        rest = [pool.submit(b, i) for i in range(1, 8)]
        time.sleep(0.3)
        gate.set()
        assert first.result() == 0 and [f.result() for f in rest] == [i * 10 for i in range(1, 8)]
    assert sizes == [1, 7] and b.batches == 2


def test_an_error_reaches_every_caller_of_its_batch_and_the_worker_goes_on() -> None:
    b = Batcher(lambda items: [1 / i for i in items])
    with pytest.raises(ZeroDivisionError):
        b(0)
    assert b(4) == 0.25 and b.batches == 2


def test_two_workers_encode_two_batches_at_once() -> None:
    """workers=2: while one batch runs, the next one starts on the other worker (no waiting for the first)."""
    running, most = [0], [0]
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=5)

    def fn(items):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        both.wait()  # only returns once two batches run at the same time
        with lock:
            running[0] -= 1
        return [i + 1 for i in items]

    b = Batcher(fn, workers=2)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(b, 1)
        time.sleep(0.2)
        second = pool.submit(b, 2)
        assert first.result(10) == 2 and second.result(10) == 3
    assert most[0] == 2 and b.batches == 2 and list(b.sizes) == [1, 1]
