"""open_clip encoders on real open_clip models (the `extras` environment: torch 2.14.1 + torchvision, see .ci/run).

Models are built from open_clip's own configs with random weights (no hub): every layer equals a reference
recorded with plain forward hooks and pooled here, the last layer feeds open_clip's own projection, truncation
at a layer equals the full forward's layer, a local checkpoint file loads, and extraction into a store keeps
exactly what the encoder computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need
from tiny_models import TEXTS, images

from stratalign.encoders import load_encoder
from stratalign.encoders.base import file_sha256

pytestmark = pytest.mark.extras

SMALL = "ViT-S-32-alt"  # a 43 M-parameter CLIP from open_clip's configs: builds in under a second


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def open_clip():
    return need("open_clip")


def _hooked(blocks: list[torch.nn.Module], run) -> list[torch.Tensor]:
    """The input of the first block and every block's output, recorded with plain forward hooks."""
    seen: list[torch.Tensor] = []
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))]
    handles += [b.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _batch_first(states: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    return [s if s.shape[0] == batch else s.transpose(0, 1) for s in states]


@pytest.mark.parametrize("arch", [SMALL, "ViT-B-32"])
def test_vision_every_layer_is_the_hooked_reference(open_clip, arch: str) -> None:
    enc = load_encoder(f"open_clip:{arch}")
    model = enc.full
    blocks = list(model.visual.transformer.resblocks)
    assert len(enc.layer_names) == len(blocks) + 1 and enc.default_pooling == "cls"
    batch = enc.preprocess(images(3))
    out = enc.forward_pooled(batch, ["cls", "mean"])
    ref = _batch_first(_hooked(blocks, lambda: model.encode_image(batch["pixel_values"])), 3)
    assert len(ref) == len(enc.layer_names)
    for layer, s in enumerate(ref):
        assert torch.allclose(out["cls"][layer], s[:, 0], atol=1e-5), layer
        assert torch.allclose(out["mean"][layer], s[:, 1:].mean(1), atol=1e-5), layer
    with torch.no_grad():  # the last layer is what open_clip projects: ln_post(class token) @ proj
        projected = model.visual.ln_post(out["cls"][-1]) @ model.visual.proj
        assert torch.allclose(projected, model.encode_image(batch["pixel_values"]), atol=1e-4)


def test_text_every_layer_is_the_hooked_reference(open_clip) -> None:
    enc = load_encoder(f"open_clip:{SMALL}:text")
    model = enc.full
    blocks = list(model.transformer.resblocks)
    batch = enc.preprocess(TEXTS)
    out = enc.forward_pooled(batch, ["mean", "eos"])
    ids = batch["input_ids"]
    ref = _batch_first(_hooked(blocks, lambda: model.encode_text(ids)), len(TEXTS))
    mask = (ids != 0).unsqueeze(-1).float()
    eos = ids.argmax(dim=-1)  # open_clip's tokenizer: the end-of-text token has the largest id
    for layer, s in enumerate(ref):
        assert torch.allclose(out["mean"][layer], (s * mask).sum(1) / mask.sum(1), atol=1e-5), layer
        assert torch.allclose(out["eos"][layer], s[torch.arange(len(TEXTS)), eos], atol=1e-5), layer
    with torch.no_grad():
        projected = model.ln_final(out["eos"][-1]) @ model.text_projection
        assert torch.allclose(projected, model.encode_text(ids), atol=1e-4)


def test_resnet_tower_layers(open_clip) -> None:
    enc = load_encoder("open_clip:RN50")
    assert enc.layer_names == ["layer1", "layer2", "layer3", "layer4"] and enc.dims == [256, 512, 1024, 2048]
    batch = enc.preprocess(images(2))
    out = enc.forward_pooled(batch, ["avg"])["avg"]
    visual = enc.full.visual
    ref = _hooked([visual.layer1, visual.layer2, visual.layer3, visual.layer4],
                  lambda: enc.full.encode_image(batch["pixel_values"]))[1:]
    for got, s in zip(out, ref):
        assert torch.allclose(got, s.mean(dim=(2, 3)), atol=1e-4)


@pytest.mark.parametrize("tower,pooling", [("image", "cls"), ("image", "mean"), ("text", "eos"), ("text", "mean")])
def test_truncation_equals_the_full_forward(open_clip, tower: str, pooling: str) -> None:
    enc = load_encoder(f"open_clip:{SMALL}:{tower}")
    blocks = list((enc.full.visual.transformer if tower == "image" else enc.full.transformer).resblocks)
    batch = enc.preprocess(images(2) if tower == "image" else TEXTS[:2])
    full = enc.forward_pooled(batch, [pooling])[pooling]
    calls = [0] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    try:
        for layer in (0, 3, len(blocks)):
            calls[:] = [0] * len(blocks)
            got = enc.forward_layer(batch, layer, pooling)
            assert torch.allclose(got, full[layer], atol=1e-5), layer
            assert calls == [1] * layer + [0] * (len(blocks) - layer), (layer, calls)  # later blocks never started
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_file(open_clip, tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(7)
    model = open_clip.create_model(SMALL, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    enc = load_encoder(f"open_clip:{SMALL}:{path}")
    loaded = enc.full.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert enc.metadata()["weights_sha256"] == file_sha256(path)
    with torch.no_grad():
        pixels = enc.preprocess(images(1))["pixel_values"]
        assert torch.allclose(enc.full.encode_image(pixels), model.eval().encode_image(pixels), atol=1e-5)


def test_extract_into_a_store_keeps_what_the_encoder_computes(open_clip, store_with_dataset) -> None:
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.store.media import load_image

    store, ds = store_with_dataset
    torch.manual_seed(3)
    [report] = extract(store, "toy", ExtractConfig(encoders=(f"open_clip:{SMALL}",), dtype="float32", batch_size=8,
                                                   shard_rows=16, loaders="threads", progress=False))
    assert report.shards_encoded == 2
    torch.manual_seed(3)  # the same random weights as the extraction's encoder
    enc = load_encoder(f"open_clip:{SMALL}")
    imgs = [load_image(p) for p in store.dataset("toy").images["path"].to_list()]
    want = enc.forward_pooled(enc.preprocess(imgs), ["cls"])["cls"]
    for layer in (0, 5, len(enc.layer_names) - 1):
        np.testing.assert_allclose(store.features("toy", enc.spec, layer), want[layer].numpy(), atol=1e-4)
