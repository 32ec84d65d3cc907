"""Loader processes (stratalign.stages.extract.image_loaders): same bytes as loader threads, late batches prepared
in-process, a clear choice of loader kind, nothing left behind in /dev/shm."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_encoders import TINY_TRANSFORM, TinyImageEncoder, TinyTextEncoder

from stratalign.encoders.base import ImageTransform
from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, choose_loaders, extract_encoder, image_loaders
from stratalign.stages.extract import reader as extract_mod
from stratalign.store.feature_store import FeatureStore
from stratalign.store.media import BadItem

pytestmark = pytest.mark.skipif(not image_loaders.processes_supported(), reason="loader processes need Linux")

PARENT = os.getpid()


def _cfg(**kw) -> ExtractConfig:
    base = dict(encoders=("tiny-image",), shard_rows=8, batch_size=3, progress=False, poll_s=0.05)
    base.update(kw)
    return ExtractConfig(**base)


def _bytes(store: FeatureStore) -> list[bytes]:
    entry = next(iter(store.entries()))
    return [entry.read_layer(i).tobytes() for i in range(len(entry.spec.dims))]


def _fresh(tmp_path: Path, name: str, ds) -> FeatureStore:
    store = FeatureStore.open(str(tmp_path / name), "a", create=True)
    store.save_dataset(ds)
    return store


def _our_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


class SlowInWorkers(ImageTransform):
    """A transform that takes 0.3 s an image in a loader process and no time in the test's own process."""

    def into(self, image, out) -> None:
        if os.getpid() != PARENT:
            time.sleep(0.3)
        super().into(image, out)


class SlowLoadingEncoder(TinyImageEncoder):
    image_transform = SlowInWorkers(resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_processes_write_the_same_bytes_as_threads_and_free_their_memory(store_with_dataset, tmp_path) -> None:
    store, ds = store_with_dataset
    image_loaders.release_spare_block()
    before = _our_blocks()
    report = extract_encoder(store, ds, TinyImageEncoder(), _cfg(loaders="processes"))
    assert report.loaders == "processes" and report.shards_encoded == 4 and report.batches_stolen == 0
    kept = _our_blocks() - before
    assert len(kept) == 1  # the idle block, kept for the next run
    again = _fresh(tmp_path, "again", ds)
    extract_encoder(again, ds, TinyImageEncoder(), _cfg(loaders="processes"))
    assert _our_blocks() - before == kept  # written into the same pages, no new block
    image_loaders.release_spare_block()
    assert _our_blocks() <= before  # and unlinked on request (and at exit)
    threads = _fresh(tmp_path, "threads", ds)
    assert extract_encoder(threads, ds, TinyImageEncoder(), _cfg(loaders="threads")).loaders == "threads"
    assert _bytes(store) == _bytes(threads) == _bytes(again)


def test_a_block_a_worker_still_writes_into_is_not_kept(store_with_dataset) -> None:
    """A dropped batch's worker may still be writing when its loader closes: that block is not reused."""
    _, ds = store_with_dataset
    paths, ids = ds.images["path"].to_list(), ds.images["image_id"].to_list()
    rows_of = image_loaders.image_rows_factory(paths, [None] * len(paths), ids, skip_bad=False)
    image_loaders.release_spare_block()
    before = _our_blocks()
    loader = image_loaders.ProcessImageLoader(image_loaders.loader_pool(2), SlowLoadingEncoder.image_transform,
                                              rows_of, 5, 2, steal=None, should_steal=lambda: False)
    pending = loader.submit(range(0, 2))
    while not pending.fut.running():
        time.sleep(0.01)
    pending.drop()
    loader.close()
    assert image_loaders._spare is None and _our_blocks() <= before
    assert loader.block.free.qsize() < loader.block.n  # its slot came back only later, if at all


def test_late_worker_batches_are_prepared_in_process(store_with_dataset, tmp_path, monkeypatch) -> None:
    """Loader processes starved of CPU (here: 0.3 s an image) must not hold the model up: once the model
    has waited STEAL_AFTER_S, the loader thread prepares the batch itself; the bytes do not change."""
    store, ds = store_with_dataset
    monkeypatch.setattr(extract_mod, "STEAL_AFTER_S", 0.05)
    t0 = time.perf_counter()
    report = extract_encoder(store, ds, SlowLoadingEncoder(), _cfg(loaders="processes"))
    took = time.perf_counter() - t0
    assert report.loaders == "processes" and report.batches_stolen >= 8  # of 11 batches
    assert took < 30 * 0.3 / 2  # far less than the workers would have needed for the 30 images
    reference = _fresh(tmp_path, "ref", ds)
    extract_encoder(reference, ds, TinyImageEncoder(), _cfg(loaders="threads"))
    assert _bytes(store) == _bytes(reference)


def test_choice_of_loaders(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert choose_loaders(_cfg(), TinyImageEncoder(), cpu) == "processes"
    assert choose_loaders(_cfg(), TinyTextEncoder(), cpu) == "threads"
    assert choose_loaders(_cfg(loaders="threads"), TinyImageEncoder(), cpu) == "threads"
    assert choose_loaders(_cfg(), TinyImageEncoder(), torch.device("cuda")) == "threads"  # CPUs are free then
    with pytest.raises(StratalignError, match="tiny-text has no plain image transform"):
        choose_loaders(_cfg(loaders="processes"), TinyTextEncoder(), cpu)
    with pytest.raises(StratalignError, match="unknown loaders 'fibers'"):
        _cfg(loaders="fibers")  # the config is checked once, when it is made
    with pytest.raises(StratalignError, match="loader workers must be >= 1"):
        _cfg(loader_workers=0)
    monkeypatch.setattr(image_loaders.SlotBlock, "fits", staticmethod(lambda n, shape: False))
    assert choose_loaders(_cfg(), TinyImageEncoder(), cpu) == "threads"  # e.g. Docker's 64 MB /dev/shm
    with pytest.raises(StratalignError, match="/dev/shm has too little free space"):
        choose_loaders(_cfg(loaders="processes"), TinyImageEncoder(), cpu)


def test_pool_is_forked_once_at_low_priority() -> None:
    pool = image_loaders.loader_pool(2)
    assert image_loaders.loader_pool(2) is pool
    pids = list(pool._processes)
    assert len(pids) == 2 and all(os.getpriority(os.PRIO_PROCESS, pid) == image_loaders.LOADER_NICE for pid in pids)


def test_bad_item_survives_the_trip_from_a_worker() -> None:
    err = pickle.loads(pickle.dumps(BadItem(7, "image x (a.png) is corrupt")))
    assert isinstance(err, BadItem) and err.row == 7 and str(err) == "image x (a.png) is corrupt"


def test_slot_block_maps_each_slot_on_its_own(tmp_path) -> None:
    """A worker writes one slot through its own mapping; the parent reads it in place, other slots untouched."""
    from PIL import Image

    block = image_loaders.SlotBlock(3, (2, 3, 8, 8))
    try:
        assert block.stride % 4096 == 0
        block.view(0, 2)[:] = -7.0
        img = tmp_path / "a.png"
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(img)
        rows = image_loaders.ImageRows(((str(img), None, 0, "a"), (str(img), None, 1, "a")), skip_bad=False)
        bad = image_loaders.fill_slot(block.shm.name, block.stride, (2, 3, 8, 8), TINY_TRANSFORM, rows)
        assert bad == []
        np.testing.assert_allclose(block.view(1, 2), (200 / 255 - 0.5) / 0.5, rtol=1e-6)
        assert (block.view(0, 2) == -7.0).all() and (block.view(2, 2) == 0).all()
    finally:
        block.close()
    assert not Path(f"/dev/shm/{block.shm.name}").exists()
