"""Writes through a symlink are refused before the work (issue 29): train (with --force) and extract did all their
work, then refused to save it through a linked folder; now they refuse first, in one line, and nothing is written
where the link points."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore


def _link_out(store: Path, folder: str, inside: bool = False) -> Path:
    """Move a store folder elsewhere (outside the store, or `inside` it under another name) and link it back."""
    outside = (store if inside else store.parent) / f"moved-{folder}"
    if (store / folder).exists():
        shutil.move(store / folder, outside)
    else:
        outside.mkdir()
    (store / folder).symlink_to(outside, target_is_directory=True)
    return outside


def test_train_refuses_a_linked_runs_folder_before_training(store_copy: Path, monkeypatch) -> None:
    from stratalign.stages.runs import training
    from stratalign.stages.runs.config import RunConfig

    outside = _link_out(store_copy, "runs")
    before = sorted(p.name for p in outside.rglob("*"))
    monkeypatch.setattr(training, "_train_prepared", lambda *a, **k: pytest.fail("trained before refusing"))
    cfg = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", objective="clip",
                    options=(("max_steps", 3), ("batch_size", 8)))
    # refused where the run id is resolved (does the store hold the run under its old id? read through the link)
    with pytest.raises(StratalignError, match="(is a symlink|leads outside the store) .*refusing to (write through|follow) it"):
        training.train_runs(FeatureStore.open(str(store_copy), "a"), [cfg], force=True)
    assert sorted(p.name for p in outside.rglob("*")) == before


def test_extract_refuses_a_linked_records_folder_before_encoding(store_copy: Path) -> None:
    from stratalign.stages.extract import ExtractConfig, extract

    outside = _link_out(store_copy, "extract_records", inside=True)  # was followed (a link inside the store)
    loads = []

    def load(spec: str, device: str):
        loads.append(spec)
        return load_tiny(spec, device)

    store = FeatureStore.open(str(store_copy), "a")
    with pytest.raises(StratalignError, match="extract_records is a symlink"):
        extract(store, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=4, progress=False), load=load,
                identify=lambda spec: {"spec": spec})
    assert loads == [] and not list(outside.iterdir())


def test_an_entry_subfolder_link_is_refused_before_zarr_writes_through_it(store_with_dataset) -> None:
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.extract.plan import entry_specs

    store, ds = store_with_dataset
    cfg = ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False)
    key = entry_specs(ds, load_tiny("tiny-image", "cpu"), cfg)[0].key
    outside = Path(store.url) / "elsewhere"  # inside the store: zarr wrote through it
    outside.mkdir()
    (Path(store.url) / "features" / key).mkdir(parents=True)
    (Path(store.url) / "features" / key / "layer_001").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StratalignError, match="layer_001 is a symlink"):
        extract(store, "toy", cfg, load=load_tiny)
    assert not list(outside.iterdir())
