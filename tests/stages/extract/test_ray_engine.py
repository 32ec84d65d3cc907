"""The Ray engine on a local Ray cluster gives the same bytes as the local engine (extras environment); its failures are
one-line errors; actors refuse to fill entries other than the driver's."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import need
from fake_encoders import load_odd, load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, entry_specs, extract
from stratalign.store.feature_store import FeatureStore


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs) for the module; workers import tests/fake_encoders.py. Ray runs in the
    extras environment (.ci/run); the tests below without Ray run everywhere."""
    ray = need("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), old or ""])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.extras
def test_ray_equals_local(tmp_path: Path, store_with_dataset, ray_session, capsys) -> None:
    from stratalign.stages.extract.ray_engine import extract_ray

    store, ds = store_with_dataset
    cfg = ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=3, progress=False)
    reports = extract_ray(store, "toy", dataclasses.replace(cfg, progress=True), load=load_tiny, actors=2)
    assert [r.shards_encoded for r in reports] == [4, 8]
    assert [r.torch_threads for r in reports] == [1, 1]  # 2 CPUs shared by 2 actors
    err = capsys.readouterr().err
    assert "extract tiny-image (ray x2)" in err and "row/s" in err  # the progress bar
    ref = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    ref.save_dataset(ds)
    extract(ref, "toy", cfg, load=load_tiny)
    for enc in ("tiny-image", "tiny-text"):
        a, b = store.find_entry("toy", enc), ref.find_entry("toy", enc)
        assert a.key == b.key
        for layer in range(len(a.spec.dims)):
            assert a.read_layer(layer).tobytes() == b.read_layer(layer).tobytes()
    pids = {m.get("pid") for m in store.find_entry("toy", "tiny-image").markers(refresh=True).values()}
    assert os.getpid() not in pids  # written by the actors, not the driver
    assert not list(Path(store.url).glob("features/*/_claims/*.json"))  # claims released


@pytest.mark.extras
def test_ray_failures_are_one_line_errors(store_with_dataset, ray_session) -> None:
    from stratalign.stages.extract.ray_engine import extract_ray

    store, _ = store_with_dataset

    def run(spec: str) -> None:
        cfg = ExtractConfig(encoders=(spec,), shard_rows=8, batch_size=3, progress=False, poll_s=0.05)
        extract_ray(store, "toy", cfg, load=load_odd, actors=2)

    # actors whose encoder metadata differs from the driver's: a clear error, not an endless loop
    with pytest.raises(StratalignError, match=r"^tiny-image-pid on .* but the driver planned .*: "
                                              r"encoder\.weights_sha256 differ between machines"):
        run("tiny-image-pid")
    assert len([e for e in store.entries() if e.spec.encoder_spec == "tiny-image-pid"]) == 1  # the driver's only
    with pytest.raises(StratalignError) as e:  # the actor's own StratalignError, verbatim
        run("tiny-image-fails")
    assert str(e.value) == "tiny-image-fails cannot read row 3 of toy"
    with pytest.raises(StratalignError) as e:  # any other error: its type and first line, no traceback
        run("tiny-image-crashes")
    assert str(e.value) == "a Ray actor failed extracting tiny-image-crashes: ValueError: weights went missing"
    # actors that cannot claim free shards: the engine gives up after a few idle rounds instead of looping
    with pytest.raises(StratalignError, match=r"no progress on shards 0, 1, 2, 3 of .* although nobody holds them"):
        run("tiny-image-noclaim")


def test_worker_refuses_entries_other_than_the_drivers(store_with_dataset) -> None:
    """Without Ray: the actor body checks its planned entries against the driver's before writing."""
    from fake_encoders import TinyImageEncoder

    from stratalign.stages.extract.ray_engine import ShardWorker

    store, ds = store_with_dataset
    cfg = ExtractConfig(encoders=("tiny-image",), shard_rows=8, batch_size=3, progress=False)
    driver = TinyImageEncoder()
    driver.metadata = lambda: {"spec": "tiny-image", "weights_sha256": "other", "preprocessing": "grey 8x8"}
    expected = [s.identity() for s in entry_specs(ds, driver, cfg)]
    threads = torch.get_num_threads()
    try:
        worker = ShardWorker(store.url, "toy", "tiny-image", cfg, load=load_tiny, expected=expected)
        with pytest.raises(StratalignError, match=r"encoder\.weights_sha256 differ"):
            worker.encode(0)
        assert list(store.entries()) == []  # nothing was created for the mismatching keys
        same = [s.identity() for s in entry_specs(ds, TinyImageEncoder(), cfg)]
        worker = ShardWorker(store.url, "toy", "tiny-image", cfg, load=load_tiny, expected=same)
        assert worker.encode(0)["encoded"] and worker.encode(0) == {"shard": 0, "encoded": False}
        worker.close()
    finally:
        torch.set_num_threads(threads)


def test_ray_error_lines() -> None:
    from stratalign.stages.extract.ray_engine import ray_error

    class Wrapped(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::ShardWorker.encode() ...\nTraceback ...")
            self.cause = cause

    assert str(ray_error(Wrapped(StratalignError("row 3 is bad")), "x")) == "row 3 is bad"
    assert str(ray_error(Wrapped(KeyError("k")), "x")) == "a Ray actor failed extracting x: KeyError: 'k'"
    died = Exception("The actor died because of an error raised in its creation task, \x1b[36mray::A()\x1b[39m\n"
                     "  File \"w.py\", line 7, in __init__\n    raise StratalignError('no store')\n"
                     "stratalign.errors.StratalignError: no store at s3://b/x")
    assert str(ray_error(died, "x")) == "no store at s3://b/x"
    oom = Exception("The actor died unexpectedly before finishing this task.\n\tclass_name: ShardWorker")
    assert str(ray_error(oom, "x")) == ("a Ray actor died extracting x: The actor died unexpectedly before "
                                        "finishing this task.")
