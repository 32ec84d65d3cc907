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
