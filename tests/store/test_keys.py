"""Every content-addressed key the store hands out, pinned for fixed inputs: existing stores are reused as
they are, so a refactor of the hashing must leave each hex string byte-identical."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from fake_encoders import TinyTextEncoder

from stratalign.store import graphs, layer_results
from stratalign.store.datasets import RawCaption, RawImage, build_dataset
from stratalign.store.feature_store import EntrySpec, FeatureStore
from stratalign.store.runs import run_id_of

SPEC = EntrySpec(dataset="toy set/α", content_fingerprint="c" * 64, modality="image",
                 encoder={"spec": "hf:org/model", "weights_sha256": "w" * 8, "preprocessing": {"size": 224}},
                 pooling="cls", layer_names=("a", "b"), dims=(4, 8), rows=10, dtype="float16", shard_rows=4)


def _tiny_dataset(tmp_path: Path):
    """Three 2x2 PPM images with fixed bytes (no encoder library in the way), labelled and split."""
    images = []
    for i in range(3):
        p = tmp_path / f"im{i}.ppm"
        p.write_bytes(b"P6 2 2 255\n" + bytes([i * 40 + j for j in range(12)]))
        images.append(RawImage(image_id=f"i{i}", path=str(p), relpath=f"im{i}.ppm", split=("train", "val", "test")[i],
                               label=("cat", "dog", "cat")[i]))
    captions = [RawCaption(caption_id=f"c{i}", image_id=f"i{i}", text=f"a  picture {i}") for i in range(3)]
    return build_dataset("tiny", images, captions, source={"kind": "test"}, workers=1)


def test_entry_key_is_pinned() -> None:
    assert SPEC.key == "toy-set--image--hf-org-model--cls--90e31f957c74bbe3"
    # entry layout 2 (sharded, inner chunks of 4 rows): its own key, pinned as well
    assert replace(SPEC, format_version=2).key == "toy-set--image--hf-org-model--cls--671170060d816c18"


def test_dataset_fingerprints_are_pinned(tmp_path: Path) -> None:
    ds = _tiny_dataset(tmp_path)
    assert ds.content_fingerprint == "4bd409bfd568953ff16086cb267725bafee68558d47ec9323a7283c317e3ca89"
    assert ds.fingerprint == "073b75376e0c46c3827a990355fe6e2d3f0ed574ed1c2347c72314b5e4ff660d"


def test_run_id_is_pinned() -> None:
    config = {"objective": "clip+structure", "head": "mlp", "n_pairs": 500, "seed": 3, "dataset": "toy",
              "layers": [1, 2], "train": {"lr": 0.001, "steps": 10}, "note": "é"}
    assert run_id_of(config) == "clip_structure-mlp-n500-s3-6f1163245127"


def test_layer_result_key_is_pinned() -> None:
    settings = {"dataset": "toy set", "vision": "hf:org/v", "text": "open_clip:ViT-B-32", "n": 100, "seed": 0,
                "k": 10, "metrics": ["mknn"], "vision_entry": "v--1", "text_entry": "t--2"}
    assert layer_results.result_key(settings) == "toy-set--hf-org-v--open_clip-ViT-B-32--4a103d09a66b"


def test_graph_key_is_pinned() -> None:
    key = graphs.graph_key("v--entry", 3, "t--entry", np.int64(5), np.array([4, 1, 2]), [7, 0], 6)
    assert key == "8cdbb31f554e70498704d71d9c291576002f907c513b96100565dd380e7190ae"


def test_prompt_cache_key_is_pinned(tmp_path: Path) -> None:
    from stratalign.stages.extract import ExtractConfig, plan_entries
    from stratalign.stages.prompts import prompt_features

    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    ds = _tiny_dataset(tmp_path)
    store.save_dataset(ds)
    encoder = TinyTextEncoder()
    entry = plan_entries(store, ds, encoder, ExtractConfig(encoders=("tiny-text",), progress=False))[0]
    prompt_features(entry, ["a photo of a cat.", "a photo of a dog."], load=lambda *_: encoder)
    assert store.loc.listdir("prompts") == ["0bff8c1ff0a29e3b5c48785e.safetensors"]
