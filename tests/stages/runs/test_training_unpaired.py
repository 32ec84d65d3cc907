"""Unpaired rows from ingest to report (docs/method.md § 3.11): a table with empty caption cells keeps those images,
and rows with an empty image cell their captions (in a split, extracted, never in a pair); a run of
clip+structure+unpaired draws them (or, with unpaired_from=pool, the train pool's rows outside its subset, taken
apart) into R_S; a sweep compares the cell with the paired-only one.

The store holds a small labelled table encoded by the tiny deterministic encoders of fake_encoders.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny
from PIL import Image

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.runs.data import run_unpaired
from stratalign.stages.runs.sweep import SweepConfig, run_sweep
from stratalign.stages.runs.training import RunConfig, resolve_run, train_run
from stratalign.stages.subsets import dataset_unpaired
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

LEVELS = ["dark", "dim", "mid", "bright", "white"]
FAST = (("max_steps", 30), ("patience", 30), ("eval_every", 5), ("warmup_steps", 10), ("dim", 16))
CAPTIONLESS = set(range(0, 120, 6))  # every 6th image has an empty caption cell
IMAGELESS = 15  # rows with a caption and an empty image cell


def _table(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = ["image,caption,label"]
    for i in range(120):
        level = i % len(LEVELS)
        px = np.clip(rng.normal(40 + 50 * level, 12, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{'' if i in CAPTIONLESS else f'a {LEVELS[level]} square number {i}'},{LEVELS[level]}")
    lines += [f",a {LEVELS[i % 5]} square with no picture {i},{LEVELS[i % 5]}" for i in range(IMAGELESS)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    root = tmp_path_factory.mktemp("unpaired")
    table = _table(root)
    fs = FeatureStore.open(str(root / "store"), "a", create=True)
    fs.save_dataset(ingest_source("table", "toy", table=str(table), image_col="image", caption_col="caption",
                                  label_col="label", keep_unpaired=True))
    extract(fs, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=load_tiny)
    return fs


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{**dict(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST), **kw})


def test_ingest_keeps_captionless_images_and_imageless_captions_as_unpaired_rows(tmp_path: Path,
                                                                                 store: FeatureStore) -> None:
    ds = store.dataset("toy")
    assert ds.images.height == 120 and ds.n_captions == 100 + IMAGELESS
    assert ds.meta["unpaired"] == {"images": 20, "captions": IMAGELESS}
    assert ds.meta["source"]["keep_unpaired"] is True and not ds.meta["skipped"]
    paired = set(ds.pairs()[0].tolist())
    ids = ds.images["image_id"].to_list()
    unpaired = {int(ids[r].split("/")[1].split(".")[0]) for r in range(120) if r not in paired}
    assert unpaired == CAPTIONLESS  # never in a pair, every one in a split
    assert len(ds.pairs()[1]) == 100 and ds.captions["image_row"].null_count() == IMAGELESS
    train_images, train_captions = dataset_unpaired(ds, "train")
    assert len(train_images) and len(train_captions)
    assert set(ds.images["split"].to_numpy()[train_images]) == {"train"}
    assert set(ds.captions["split"].to_numpy()[train_captions]) == {"train"}
    assert ds.captions["image_row"].gather(train_captions).null_count() == len(train_captions)
    splits = {s: len(dataset_unpaired(ds, s)[1]) for s in ("train", "val", "test")}
    assert sum(splits.values()) == IMAGELESS  # each caption without an image in one split, drawn from its id
    assert store.find_entry("toy", "tiny-image", None, modality="image").spec.rows == 120  # extracted like every row
    assert store.find_entry("toy", "tiny-text", None, modality="text").spec.rows == 100 + IMAGELESS
    # without the flag the same table is refused, as before (an empty image path or caption is a bad record)
    with pytest.raises(StratalignError, match="empty image path"):
        ingest_source("table", "toy2", table=str(_table(tmp_path)), image_col="image", caption_col="caption")


def test_run_draws_dataset_or_pool_rows_never_validation_or_the_subset(store: FeatureStore) -> None:
    ds = store.dataset("toy")
    opts = FAST + (("unpaired", 8),)
    run = resolve_run(store, _cfg(objective="clip+structure+unpaired", n_pairs=30, options=opts))
    images, captions = run_unpaired(run, run.inputs, "dataset")
    assert (images.tolist(), captions.tolist()) == tuple(r.tolist() for r in dataset_unpaired(ds, "train"))
    pool = resolve_run(store, _cfg(objective="clip+structure+unpaired", n_pairs=30,
                                   options=opts + (("unpaired_from", "pool"),)))
    images, captions = run_unpaired(pool, pool.inputs, "pool")
    assert not set(images.tolist()) & set(pool.subset.image_rows.tolist())
    assert not set(captions.tolist()) & set(pool.subset.caption_rows.tolist())
    assert not set(images.tolist()) & set(pool.val.image_rows.tolist())
    assert not set(captions.tolist()) & set(pool.val.caption_rows.tolist())
    assert set(ds.images["split"].to_numpy()[images]) == {"train"} and len(captions) > 0
    assert pool.run_id != run.run_id
    res = train_run(store, _cfg(objective="clip+structure+unpaired", n_pairs=30,
                                options=opts + (("unpaired_from", "pool"),)))
    met = RunRegistry(store).metrics(res["run_id"])
    assert met["unpaired_rows"] == {"images": len(images), "captions": len(captions)}
    # a clip run asked for a pool source without unpaired rows keeps the id it always had
    plain = resolve_run(store, _cfg(objective="clip", n_pairs=30, options=FAST + (("unpaired_from", "pool"),)))
    assert plain.run_id == resolve_run(store, _cfg(objective="clip", n_pairs=30)).run_id


def test_sweep_compares_unpaired_cell_with_the_paired_only_cell(store: FeatureStore, tmp_path: Path) -> None:
    cfg = SweepConfig(base=_cfg(options=FAST + (("unpaired_from", "pool"),)), n_pairs=(30,),
                      seeds=(0, 1), objectives=("clip", "clip+structure", "clip+structure+unpaired"),
                      layer_rules=("last",))
    res = run_sweep(store, cfg, str(tmp_path / "out"), progress=False)
    control = res.comparisons.filter(res.comparisons["comparison"] == "control")
    assert control.height and set(control["method"]) == {"clip+structure+unpaired"}
    assert set(control["baseline"]) == {"clip+structure"} and set(control["seeds"]) == {2}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**clip+structure+unpaired** vs clip+structure, the same cell without what it adds" in report
