"""The Ray engine on a local Ray instance gives the same bytes as the local engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.pipeline.extract import ExtractConfig, extract
from stratalign.stores.feature_store import FeatureStore

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_equals_local(tmp_path: Path, store_with_dataset, monkeypatch) -> None:
    from stratalign.pipeline.ray_engine import extract_ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    store, ds = store_with_dataset
    cfg = ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=3, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reports = extract_ray(store, "toy", cfg, load=load_tiny, actors=2)
    finally:
        ray.shutdown()
    assert [r.shards_encoded for r in reports] == [4, 8]
    ref = FeatureStore.open(str(tmp_path / "ref"), "a")
    ref.save_dataset(ds)
    extract(ref, "toy", cfg, load=load_tiny)
    for enc in ("tiny-image", "tiny-text"):
        a, b = store.find_entry("toy", enc), ref.find_entry("toy", enc)
        assert a.key == b.key
        for layer in range(len(a.spec.dims)):
            assert a.read_layer(layer).tobytes() == b.read_layer(layer).tobytes()
    pids = {m.get("pid") for m in store.find_entry("toy", "tiny-image").markers(refresh=True).values()}
    assert os.getpid() not in pids  # written by the actors, not the driver
