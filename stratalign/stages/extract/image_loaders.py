"""Image batches decoded and preprocessed by worker processes at low priority, into shared memory.

The CPU path of extraction. On a CPU-only machine the model's forward pass already uses every core, and
loader *threads* hurt it twice: they take the GIL from the thread driving the model, and at equal priority
they preempt one of torch's OpenMP threads while the others wait for it at the op's barrier (measured on 2
cores: a batch's decoding and resizing cost the forward ~1.3x its own CPU time). Worker processes at nice 19
hold no lock the model needs and run in the gaps the model leaves.

- The pool is forked once per process and reused (`loader_pool`). Fork, because the workers then need no
  imports (torch alone takes seconds to import); once per process and early (`extract()` starts it before
  it loads a model), because a pool forked from a process that has run a model shares its activation pages
  copy-on-write, and the next forward passes pay to copy them (measured: ~1 s more for 128 images with
  EfficientNet-Lite0). The workers never call torch.
- Each batch goes to a slot of one shared-memory block (`SlotBlock`); the model reads it in place. The block
  outlives its loader (`take_block`, `give_back_block`): the next extraction in the process writes into pages
  that exist, where fresh ones cost the kernel's zeroing on first touch.
- Under load from other processes, nice-19 workers can starve. Once the model has waited a while for a batch
  its worker has not finished (`should_steal`, extract_loading.STEAL_AFTER_S), the thread waiting on it prepares
  that batch itself (`steal`) and the worker's late copy is dropped; with every slot still held by late
  workers, a new batch is prepared in-process straight away.
- Linux only (fork, /dev/shm, PR_SET_PDEATHSIG so that workers die with their parent); elsewhere, or when
  /dev/shm is too small (Docker's default is 64 MB), extraction uses loader threads.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import numpy as np

from stratalign.errors import StratalignError
from stratalign.store.media import load_image_or_blank

LOADER_NICE = 19
_PR_SET_PDEATHSIG = 1
_FORK_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_POLL_S = 0.05  # how often a thread waiting on a late worker checks whether to load the batch itself
_START_S = 8.0  # signals wait while the loader processes start: never longer than this

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
_spare: "SlotBlock | None" = None  # the last loader's block, idle, kept for the next one (see take_block)


@dataclass(frozen=True)
class ImageRows:
    """What a worker needs to load some rows: (path, ingest hash, row, image id) each, and --skip-bad."""

    items: tuple[tuple[str, str | None, int, str], ...]
    skip_bad: bool


def processes_supported() -> bool:
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


def _worker_init(parent: int) -> None:
    """In each worker: lowest CPU priority, die with the parent (a kill -9 leaves no orphans), and ignore Ctrl-C
    (a terminal sends it to the whole process group: the parent handles it and the workers end with it, quietly
    instead of each printing a KeyboardInterrupt traceback); SIGTERM ends a worker at once (the CLI's handler,
    inherited through fork, would unwind it with a traceback). Both signals are blocked from the fork until these
    handlers are set, so that one landing meanwhile never runs the parent's handler in the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_SIGNALS)  # blocked by the parent around the fork (loader_pool)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, LOADER_NICE)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def loader_pool(workers: int) -> ProcessPoolExecutor:
    """The process-wide pool of `workers` loader processes, forked now if it is not running yet."""
    global _pool
    with _pool_lock:
        if _pool is not None and (_pool._broken or len(_pool._processes) != workers):  # type: ignore[attr-defined]
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None
        if _pool is None:
            # SIGINT/SIGTERM wait until every worker is forked and set up, and the pool is known to atexit: a signal
            # in the middle left a half-started pool whose shutdown never ended (issue 29: extract hung)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_SIGNALS)
            try:
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                           initializer=_worker_init, initargs=(os.getpid(),))
                _pool = pool
                for f in [pool.submit(os.getpid) for _ in range(workers)]:  # fork every worker now
                    f.result(timeout=_START_S)
            except FutureTimeout:
                _pool.shutdown(wait=False, cancel_futures=True)
                _pool = None
                raise StratalignError(f"the image loader processes did not start within {_START_S:g} s; rerun with "
                                      "--loaders threads") from None
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return _pool


@atexit.register
def _shutdown_pool() -> None:
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    release_spare_block()


def take_block(n: int, shape: tuple[int, ...]) -> "SlotBlock":
    """A block of `n` slots of `shape` for one loader: the spare one when it matches, else a new one.

    Fresh shared memory is slow to fill: the kernel zeroes each page on first touch (measured here ~4.5 us a
    page, ~20 ms a 32-image slot at 224 px in the nice-19 workers, and ~25 ms more to unlink the block), so a
    block outlives its loader and the next extraction in this process writes into pages that already exist."""
    block = _pop_spare()
    if block is not None and block.serves(n, shape):
        return block
    if block is not None:
        block.close()
    return SlotBlock(n, shape)


def give_back_block(block: "SlotBlock") -> None:
    """Keep an idle block (every slot back: no worker writes into it any more) as the spare; free any other."""
    global _spare
    if block.free.qsize() == block.n:
        with _pool_lock:
            if _spare is None:
                _spare = block
                return
    block.close()


def spare_fits(n: int, shape: tuple[int, ...]) -> bool:
    """Whether a loader of `n` slots of `shape` has room: the spare block serves it, or /dev/shm has space."""
    spare = _spare
    return (spare is not None and spare.serves(n, shape)) or SlotBlock.fits(n, shape)


def _pop_spare() -> "SlotBlock | None":
    global _spare
    with _pool_lock:
        block, _spare = _spare, None
    return block


def release_spare_block() -> None:
    """Free the idle block kept for the next extraction (its slots' shared memory)."""
    block = _pop_spare()
    if block is not None:
        block.close()


def fill_slot(block: str, offset: int, shape: tuple[int, ...], transform: Any, rows: ImageRows) -> list[int]:
    """In a worker: load and preprocess `rows` into the slot at `offset` of shared block `block`; returns the
    bad rows. The slot is mapped for this batch only (pre-faulted in one call), so an idle worker holds no
    shared memory, and straight from /dev/shm: SharedMemory would register it with a resource tracker."""
    with open(f"/dev/shm/{block}", "r+b") as f:
        mm = mmap.mmap(f.fileno(), int(np.prod(shape)) * 4, offset=offset,
                       flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    try:
        out = np.ndarray(shape, np.float32, buffer=mm)
        bad = load_into(out, transform, rows)
        del out
    finally:
        mm.close()
    return bad


def load_into(out: np.ndarray, transform: Any, rows: ImageRows) -> list[int]:
    """Decode, crop and normalise each image straight into `out[i]`; a bad image raises BadItem, or under
    skip_bad becomes a white image and its row is returned."""
    bad = []
    for i, (path, sha, row, image_id) in enumerate(rows.items):
        image, was_bad = load_image_or_blank(path, sha, row=row, image_id=image_id, skip_bad=rows.skip_bad)
        transform.into(image, out[i])
        if was_bad:
            bad.append(row)
    return bad


class SlotBlock:
    """`n` batch slots of `shape` float32 in one shared-memory block, handed out and returned by index.
    Slots start on page boundaries, so a worker can map one alone."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.n = n
        self.shape = shape
        nbytes = int(np.prod(shape)) * 4
        self.stride = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.shm = shared_memory.SharedMemory(create=True, size=n * self.stride)
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self.free.put(i)

    @staticmethod
    def fits(n: int, shape: tuple[int, ...]) -> bool:
        """Whether /dev/shm has room for the block with a margin (a full tmpfs kills workers with SIGBUS)."""
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return False
        return st.f_bavail * st.f_frsize > 2 * n * int(np.prod(shape)) * 4

    def serves(self, n: int, shape: tuple[int, ...]) -> bool:
        """Whether this block is the one a loader of `n` slots of `shape` would make."""
        return self.n == n and self.shape == shape

    def view(self, slot: int, rows: int) -> np.ndarray:
        """The first `rows` images of a slot, in place."""
        return np.ndarray((rows, *self.shape[1:]), np.float32, buffer=self.shm.buf, offset=slot * self.stride)

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a tensor view is still alive somewhere; the mapping goes with it
            pass
        self.shm.unlink()


class ProcessImageLoader:
    """Prepares image batches in the loader pool: `submit(rows)` returns a handle whose `result()` gives
    (rows, {"pixel_values": tensor in a slot}, bad rows, release) in the thread that waits on it, and whose
    `drop()` gives up a batch nobody will use."""

    def __init__(self, pool: ProcessPoolExecutor, transform: Any, rows_of: Callable[[range], ImageRows],
                 batch_size: int, slots: int, steal: Callable[[range], tuple[range, dict, list[int]]],
                 should_steal: Callable[[], bool]) -> None:
        self.pool = pool
        self.transform = transform
        self.rows_of = rows_of
        self.steal = steal
        self.should_steal = should_steal
        self.block = take_block(slots, (batch_size, 3, transform.crop, transform.crop))
        self.stolen = 0

    def submit(self, rows: range) -> "_Pending":
        try:
            slot = self.block.free.get_nowait()
        except queue.Empty:  # every slot waits for a late worker: this batch is prepared in-process
            return _Pending(self, rows, None, None)
        fut = self.pool.submit(fill_slot, self.block.shm.name, slot * self.block.stride,
                               (len(rows), *self.block.shape[1:]), self.transform, self.rows_of(rows))
        return _Pending(self, rows, slot, fut)

    def release(self, slot: int) -> None:
        self.block.free.put(slot)

    def close(self) -> None:
        give_back_block(self.block)


class _Pending:
    def __init__(self, loader: ProcessImageLoader, rows: range, slot: int | None, fut: Future | None) -> None:
        self.loader, self.rows, self.slot, self.fut = loader, rows, slot, fut

    def drop(self) -> None:
        """Give the slot back once the worker is done with it (it may still be writing)."""
        if self.fut is not None:
            if self.fut.cancel():  # not started yet
                self.loader.release(self.slot)  # type: ignore[arg-type]
            else:
                self.fut.add_done_callback(lambda _, slot=self.slot: self.loader.release(slot))  # type: ignore[misc]
            self.fut = None

    def result(self) -> tuple[range, dict, list[int], Callable[[], None]]:
        import torch

        loader = self.loader
        while self.fut is not None:
            try:
                bad = self.fut.result(timeout=_POLL_S)
            except FutureTimeout:
                if loader.should_steal():  # the model has waited too long: load it here instead
                    self.drop()
                    loader.stolen += 1
                    break
                continue
            except BaseException:
                self.drop()
                raise
            pixels = torch.from_numpy(loader.block.view(self.slot, len(self.rows)))  # type: ignore[arg-type]
            return self.rows, {"pixel_values": pixels}, bad, partial(loader.release, self.slot)
        rows, batch, bad = loader.steal(self.rows)
        return rows, batch, bad, no_release


def no_release() -> None:
    """The release of a batch that holds no slot."""


def image_rows_factory(paths: Sequence[str], shas: Sequence[str | None], ids: Sequence[str],
                       skip_bad: bool) -> Callable[[range], ImageRows]:
    """rows -> ImageRows for the workers, from the dataset's image columns."""
    def rows_of(rows: range) -> ImageRows:
        return ImageRows(tuple((paths[r], shas[r], r, ids[r]) for r in rows), skip_bad)
    return rows_of
