"""The reading side of extraction: rows -> raw items -> model-ready batches, prepared ahead of the model by
loader threads or, on CPU for plain image transforms, low-priority loader processes (see image_loaders.py).

A loader's `submit(rows)` returns a handle whose `result()` gives (rows, batch, bad rows, release); a batch
that a loader process is late with is prepared in-process once the model has waited `STEAL_AFTER_S`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from stratalign.errors import StratalignError
from stratalign.stages.extract.config import ExtractConfig
from stratalign.stages.extract.image_loaders import (
    ProcessImageLoader,
    image_rows_factory,
    loader_pool,
    no_release,
    processes_supported,
    spare_fits,
)
from stratalign.store.containment import DatasetMedia
from stratalign.store.containment import image_roots as containment_roots
from stratalign.store.datasets import PairDataset
from stratalign.store.media import load_image_or_blank


def image_roots(ds: PairDataset) -> list[str]:
    """The folders a dataset's images may be read from (store.containment.image_roots)."""
    return containment_roots(ds.meta)


def check_image_paths(ds: PairDataset) -> None:
    """Refuse, naming the row, an image path of the dataset table outside its declared image roots (an edited
    or crafted images.parquet must not make extract read files elsewhere): store.containment's one rule."""
    DatasetMedia.of(ds).check()


class RowReader:
    """Turns row indices into raw items (PIL images or caption strings) for one modality."""

    def __init__(self, ds: PairDataset, modality: str, skip_bad: bool) -> None:
        self.modality = modality
        self.skip_bad = skip_bad
        if modality == "image":
            self.paths = ds.images["path"].to_list()
            self.shas = ds.images["sha"].to_list()
            self.ids = ds.images["image_id"].to_list()
            check_image_paths(ds)
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

    def __init__(self, prepare: BatchPreparer, n: int) -> None:
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


def make_loader(kind: str, prepare: BatchPreparer, cfg: ExtractConfig, hunger: Hunger) -> Any:
    if kind == "threads":
        return ThreadLoader(prepare, cfg.loader_workers)
    reader = prepare.reader
    return ProcessImageLoader(loader_pool(cfg.loader_workers), prepare.encoder.image_transform,
                              image_rows_factory(reader.paths, reader.shas, reader.ids, cfg.skip_bad),
                              cfg.batch_size, cfg.slots, prepare,
                              lambda: hunger.waited() > STEAL_AFTER_S)


def batches(start: int, stop: int, size: int) -> list[range]:
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
