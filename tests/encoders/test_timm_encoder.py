"""timm encoders on real timm models (the `extras` environment: torch 2.14.1 + torchvision, see .ci/run).

Models are built from timm's registry with random weights and loaded from a local checkpoint file: every layer
equals a reference recorded with plain forward hooks and pooled here, the last layer is what timm's
`forward_features` normalises, truncation at a layer equals the full forward's layer, and extraction into a
store keeps exactly what the encoder computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need
from tiny_models import images

from stratalign.encoders import load_encoder
from stratalign.encoders.base import file_sha256

pytestmark = pytest.mark.extras

VIT = "vit_tiny_patch16_224"  # 5.7 M parameters, 12 blocks, one class token
CNN = "resnet18"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def timm():
    return need("timm")


def _checkpoint(timm, name: str, folder: Path, seed: int = 0, how: str = "safetensors") -> tuple[Path, dict]:
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    path = folder / f"{name}.{'safetensors' if how == 'safetensors' else 'pth'}"
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:  # a training checkpoint: timm's loader prefers the EMA weights
        torch.save({"state_dict_ema": state, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    return path, state


def _hooked(model: torch.nn.Module, modules: list[torch.nn.Module], pixels: torch.Tensor,
            input_of_first: bool) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = []
    if input_of_first:
        handles.append(modules[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone())))
    handles += [m.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())) for m in modules]
    try:
        with torch.no_grad():
            model.forward_features(pixels)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("how", ["safetensors", "ema-checkpoint"])
def test_vit_from_a_checkpoint_every_layer_is_the_hooked_reference(timm, tmp_path: Path, how: str) -> None:
    path, state = _checkpoint(timm, VIT, tmp_path, seed=1, how=how)
    enc = load_encoder(f"timm:{VIT}:{path}")
    assert len(enc.layer_names) == 13 and enc.default_pooling == "cls" and enc.dims == [192] * 13
    assert all(torch.equal(enc.model.state_dict()[k], v) for k, v in state.items())
    assert enc.metadata()["weights_sha256"] == file_sha256(path)
    pixels = enc.preprocess(images(3))["pixel_values"]
    assert pixels.shape == (3, 3, 224, 224)
    out = enc.forward_pooled({"pixel_values": pixels}, ["cls", "mean"])
    ref = _hooked(enc.model, list(enc.model.blocks), pixels, input_of_first=True)
    assert len(ref) == 13
    for layer, s in enumerate(ref):
        assert torch.allclose(out["cls"][layer], s[:, 0], atol=1e-5), layer
        assert torch.allclose(out["mean"][layer], s[:, enc.model.num_prefix_tokens:].mean(1), atol=1e-5), layer
    with torch.no_grad():  # the last layer is the input of timm's final norm
        assert torch.allclose(enc.model.norm(ref[-1]), enc.model.forward_features(pixels), atol=1e-5)


def test_cnn_stages_are_the_hooked_reference(timm, tmp_path: Path) -> None:
    path, _ = _checkpoint(timm, CNN, tmp_path, seed=2)
    enc = load_encoder(f"timm:{CNN}:{path}")
    assert enc.layer_names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert enc.dims == [64, 64, 128, 256, 512] and enc.poolings == ("avg",)
    pixels = enc.preprocess(images(2))["pixel_values"]
    out = enc.forward_pooled({"pixel_values": pixels}, ["avg"])["avg"]
    modules = dict(enc.model.named_modules())
    ref = _hooked(enc.model, [modules[n] for n in enc.layer_names], pixels, input_of_first=False)
    for layer, s in enumerate(ref):
        assert torch.allclose(out[layer], s.mean(dim=(2, 3)), atol=1e-5), layer


def test_random_weights_from_the_registry(timm) -> None:
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False)
    from stratalign.encoders.base import ImageTransform
    from stratalign.encoders.timm_encoder import TimmEncoder

    enc = TimmEncoder(f"timm:{VIT}", model, ImageTransform(resize=248, crop=224), name=VIT, checkpoint=None)
    assert len(enc.layer_names) == 13 and enc.metadata()["source"] == f"timm {VIT} (pretrained)"
    from stratalign.encoders.base import state_dict_sha256

    assert enc.metadata()["weights_sha256"] == state_dict_sha256(model)


@pytest.mark.parametrize("name,pooling", [(VIT, "cls"), (VIT, "mean"), (CNN, "avg")])
def test_truncation_equals_the_full_forward(timm, tmp_path: Path, name: str, pooling: str) -> None:
    path, _ = _checkpoint(timm, name, tmp_path)
    enc = load_encoder(f"timm:{name}:{path}")
    batch = enc.preprocess(images(2))
    full = enc.forward_pooled(batch, [pooling])[pooling]
    for layer in range(len(enc.layer_names)):
        assert torch.allclose(enc.forward_layer(batch, layer, pooling), full[layer], atol=1e-5), layer
    if name == VIT:  # blocks after the layer never start
        started = [0] * len(enc.model.blocks)
        handles = [b.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, 1))
                   for i, b in enumerate(enc.model.blocks)]
        try:
            enc.forward_layer(batch, 4, pooling)
        finally:
            for h in handles:
                h.remove()
        assert started == [1] * 4 + [0] * (len(started) - 4)


def test_extract_into_a_store_keeps_what_the_encoder_computes(timm, store_with_dataset, tmp_path: Path) -> None:
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.store.media import load_image

    store, _ = store_with_dataset
    path, _ = _checkpoint(timm, VIT, tmp_path, seed=4)
    spec = f"timm:{VIT}:{path}"
    [report] = extract(store, "toy", ExtractConfig(encoders=(spec,), dtype="float32", batch_size=8, shard_rows=16,
                                                   loaders="threads", progress=False))
    assert report.shards_encoded == 2
    enc = load_encoder(spec)
    imgs = [load_image(p) for p in store.dataset("toy").images["path"].to_list()]
    want = enc.forward_pooled(enc.preprocess(imgs), ["cls"])["cls"]
    for layer in (0, 6, 12):
        np.testing.assert_allclose(store.features("toy", spec, layer), want[layer].numpy(), atol=1e-4)
