"""The per-encoder flow both engines share: a text encoder over a labelled dataset leaves its zero-shot prompt
features in the store, so evaluation never loads the encoder; `extract` picks its engine by name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_encoders import TinyImageEncoder, TinyTextEncoder, load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract, plan_encoder
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.prompts import class_prompts, prompt_features
from stratalign.store.feature_store import FeatureStore


@pytest.fixture
def labelled_store(tmp_path: Path, csv_table: Path) -> tuple[FeatureStore, object]:
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    ds = ingest_source("table", "lab", table=str(csv_table), image_col="image", caption_col="caption",
                       label_col="label")
    store.save_dataset(ds)
    return store, ds


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"encoders": ("tiny-image", "tiny-text"), "shard_rows": 8, "batch_size": 4,
                            "progress": False, "loaders": "threads", **kw})


def _never_load(spec: str, device: str):
    raise AssertionError(f"the prompt cache missed: {spec} was loaded")


def _expected(ds, pooling: str) -> list[np.ndarray]:
    enc = TinyTextEncoder()
    with torch.inference_mode():
        layers = enc.forward_pooled(enc.preprocess(class_prompts(ds)[2]), [pooling])[pooling]
    return [t.float().numpy() for t in layers]


def test_local_extract_caches_class_prompts_of_each_text_entry(labelled_store) -> None:
    store, ds = labelled_store
    extract(store, "lab", _cfg(poolings=("all",)), load=load_tiny)
    assert len(store.loc.listdir("prompts")) == 2  # tiny-text's mean and cls entries; none for the image encoder
    for pooling in ("mean", "cls"):
        entry = store.find_entry("lab", "tiny-text", pooling)
        got = prompt_features(entry, class_prompts(ds)[2], load=_never_load)
        for a, b in zip(got, _expected(ds, pooling)):
            np.testing.assert_array_equal(a, b)


def test_shared_planning_caches_prompts_before_any_entry_exists(labelled_store) -> None:
    """`plan_encoder` is what the Ray driver runs per encoder: prompts cached, nothing else written."""
    store, ds = labelled_store
    specs = plan_encoder(store, ds, TinyTextEncoder(), _cfg(), "cpu")
    assert [s.pooling for s in specs] == ["mean"] and store.entry_folders() == []
    assert len(store.loc.listdir("prompts")) == 1
    assert plan_encoder(store, ds, TinyImageEncoder(), _cfg(), "cpu")[0].modality == "image"
    assert len(store.loc.listdir("prompts")) == 1  # an image encoder has no prompts


def test_unlabelled_dataset_caches_no_prompts(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    assert store.loc.listdir("prompts") == []


def test_unknown_engine_is_one_line(labelled_store) -> None:
    store, _ = labelled_store
    with pytest.raises(StratalignError, match="^unknown engine 'spark': use local or ray$"):
        extract(store, "lab", _cfg(), load=load_tiny, engine="spark")
    assert store.entry_folders() == []


@pytest.mark.slow
def test_ray_engine_caches_the_same_prompts(labelled_store, tmp_path: Path, monkeypatch) -> None:
    """Through the one entry point: the Ray driver starts (and stops) its own local Ray instance."""
    pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    store, ds = labelled_store
    extract(store, "lab", _cfg(encoders=("tiny-text",)), load=load_tiny, engine="ray")
    ref = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    ref.save_dataset(ds)
    extract(ref, "lab", _cfg(encoders=("tiny-text",)), load=load_tiny)
    names = store.loc.listdir("prompts")
    assert names == ref.loc.listdir("prompts") and len(names) == 1
    assert store.loc.read_bytes("prompts", names[0]) == ref.loc.read_bytes("prompts", names[0])
