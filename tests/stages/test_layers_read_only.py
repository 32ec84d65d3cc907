"""A store opened read-only (`stratalign.open_store(path)`'s default) is refused by a stage that would write,
before it computes anything, with the fix; it used to die on the write after computing everything."""

from __future__ import annotations

import pytest
from fake_encoders import load_tiny

import stratalign
from stratalign.errors import StratalignError
from stratalign.stages import layers as layers_stage
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.runs import training
from stratalign.stages.runs.config import RunConfig


def test_read_only_store_is_refused_before_any_work(store_with_dataset, monkeypatch) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    ro = stratalign.open_store(store.url)

    def no_work(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(layers_stage, "compute_layer_matrices", no_work)
    monkeypatch.setattr(training, "_prepare", no_work)
    cfg = layers_stage.LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("cka",), k=3)
    fix = f": open it for writing, stratalign.open_store({store.url!r}, 'a')"
    with pytest.raises(StratalignError) as e:
        layers_stage.run_layers(ro, cfg)
    assert str(e.value) == f"store {store.url} is open read-only and run_layers (matrices, heatmap, layer choice) " \
                           f"writes to it{fix}"
    with pytest.raises(StratalignError, match=r"is open read-only and training 1 run\(s\) writes to it"):
        training.train_run(ro, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last"))
