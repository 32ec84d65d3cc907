"""A sweep resolves once: each dataset table is decoded at most once and features/ is listed at most once per
store object, however many cells it has (issue 25: a sweep of N cells decoded them 6N times and listed
features/ 20 times). The store's reads are counted where they happen (store.location.Location)."""

from __future__ import annotations

from collections import Counter

import pytest
from toy_store import FAST, toy_store

from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.evaluate import evaluate_saved_run
from stratalign.stages.runs.sweep import SweepConfig, run_sweep
from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import Location


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return toy_store(tmp_path_factory.mktemp("reads")).url


class Reads:
    """Counts of the store's table decodes (datasets/<name>/<table>.parquet read) and features/ listings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tables: Counter[str] = Counter()
        self.listings = 0
        read_bytes, listdir, listdirs = Location.read_bytes, Location.listdir, Location.listdirs

        def counted_read(loc: Location, *parts: str, **kw):
            if len(parts) == 3 and parts[0] == "datasets" and parts[2].endswith(".parquet"):
                self.tables[f"{parts[1]}/{parts[2]}"] += 1
            return read_bytes(loc, *parts, **kw)

        def counted(real):
            def listing(loc: Location, *parts: str, **kw):
                if parts == ("features",):
                    self.listings += 1
                return real(loc, *parts, **kw)
            return listing

        monkeypatch.setattr(Location, "read_bytes", counted_read)
        monkeypatch.setattr(Location, "listdir", counted(listdir))
        monkeypatch.setattr(Location, "listdirs", counted(listdirs))


def _sweep(n_seeds: int) -> SweepConfig:
    # validation split: the toy's 8 val pairs would make a sweep's cells k-fold ones (5 runs a seed, then a refit)
    base = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", options=FAST, validation="split")
    return SweepConfig(base=base, seeds=tuple(range(n_seeds)), objectives=("clip", "clip+structure"),
                       layer_rules=("last", "0,0"))


def test_a_sweep_decodes_each_table_once_and_lists_features_once(store_url: str, monkeypatch) -> None:
    reads = Reads(monkeypatch)
    store = FeatureStore.open(store_url, "a")
    result = run_sweep(store, _sweep(2), progress=False)
    # 8 runs of 4 cells, each a selection run and a final run stopped at its cell's chosen step
    assert result.trained == 16 and result.runs.height == 8
    assert set(reads.tables.values()) == {1}, reads.tables  # images.parquet and captions.parquet, once each
    assert reads.listings <= 1
    again = FeatureStore.open(store_url, "a")  # every cell done: skipped, still read once
    reads.tables.clear()
    reads.listings = 0
    done = run_sweep(again, _sweep(3), progress=False)  # 4 cells more than before
    # a third seed: the selection runs of seeds 0-1 are reused (the finals may stop elsewhere: the mean moved)
    assert done.skipped >= 8 and done.trained + done.skipped == 24
    assert max(reads.tables.values()) <= 1 and reads.listings <= 1


def test_evaluating_a_saved_run_decodes_its_dataset_once(store_url: str, monkeypatch) -> None:
    store = FeatureStore.open(store_url, "a")
    rid = run_sweep(store, _sweep(1), progress=False).run_ids[0]
    reads = Reads(monkeypatch)
    fresh = FeatureStore.open(store_url, "a")
    res = evaluate_saved_run(fresh, rid)
    assert res["i2t_R@1"] >= 0
    assert set(reads.tables.values()) == {1}, reads.tables
    assert reads.listings == 0  # the run names its entries: nothing is looked up
