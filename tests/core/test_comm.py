"""CoMM on cached features: masks, NT-Xent and the CoMM loss against loops, augmentation, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stratalign.core.comm import (
    MASKS,
    CommModel,
    augment_features,
    comm_loss,
    comm_step_loss,
    fused_features,
    nt_xent,
)
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig, load_heads, save_heads, train_comm


def naive_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    a = [r / r.norm() for r in a.double()]
    b = [r / r.norm() for r in b.double()]
    z = a + b
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        others = [float(z[i] @ z[j]) / tau for j in range(2 * n) if j != i]
        m = max(others)
        lse = m + math.log(sum(math.exp(v - m) for v in others))
        total += -(float(z[i] @ z[pos]) / tau - lse)
    return total / (2 * n)


def test_nt_xent_matches_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for tau in (0.1, 0.5):
        assert float(nt_xent(a, b, tau)) == pytest.approx(naive_nt_xent(a, b, tau), rel=1e-5)


def test_comm_loss_matches_loops():
    g = torch.Generator().manual_seed(1)
    z1 = {m: torch.randn(6, 4, generator=g) for m in MASKS}
    z2 = {m: torch.randn(6, 4, generator=g) for m in MASKS}
    want = sum(0.5 * (naive_nt_xent(z1[m], z2["both"], 0.1) + naive_nt_xent(z2[m], z1["both"], 0.1))
               for m in ("image", "text", "both")) / 3
    assert float(comm_loss(z1, z2)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(StratalignError, match="lacks masks"):
        comm_loss({"both": z1["both"]}, z2)


def test_model_structure_and_masks():
    torch.manual_seed(0)
    model = CommModel(10, 6, dim=32, heads=8, out_dim=256).eval()
    assert [type(m).__name__ for m in model.proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                                                      "ReLU", "Linear"]
    xi, xt = torch.randn(5, 10), torch.randn(5, 6)
    assert model(xi, xt).shape == (5, 256)
    assert model.fuse(xi, xt).shape == (5, 32)
    # image-only output ignores the text input, text-only ignores the image input
    assert torch.allclose(model.fuse(xi, xt, "image"), model.fuse(xi, torch.randn(5, 6), "image"), atol=1e-6)
    assert torch.allclose(model.fuse(xi, xt, "text"), model.fuse(torch.randn(5, 10), xt, "text"), atol=1e-6)
    assert not torch.allclose(model.fuse(xi, xt), model.fuse(xi, torch.randn(5, 6)))
    with pytest.raises(StratalignError, match="mask"):
        model.fuse(xi, xt, "audio")


def test_augmentation_drops_and_scales_noise_per_dim():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(20000, 2)
    std = torch.tensor([[0.0, 2.0]])
    out = augment_features(x, std, drop=0.25, noise=0.5, generator=g)
    assert float((out[:, 0] == 0).float().mean()) == pytest.approx(0.25, abs=0.02)
    assert float(out[:, 0][out[:, 0] != 0].std()) == pytest.approx(0.0, abs=1e-6)
    assert float(out[:, 1].std()) == pytest.approx(math.sqrt(1.0 + 0.25 * 0.75), rel=0.05)


def test_step_loss_has_gradient():
    torch.manual_seed(0)
    model = CommModel(8, 6, dim=16, heads=8)
    xi, xt = torch.randn(12, 8), torch.randn(12, 6)
    loss = comm_step_loss(model, xi, xt, xi.std(0, keepdim=True), xt.std(0, keepdim=True))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and model.img_in.weight.grad.abs().sum() > 0


def test_train_comm_and_fused_features(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.standard_normal((160, 4))
    xi = (s @ rng.standard_normal((4, 12)) + 0.3 * rng.standard_normal((160, 12))).astype(np.float16)
    xt = (s @ rng.standard_normal((4, 8)) + 0.3 * rng.standard_normal((160, 8))).astype(np.float32)
    cfg = TrainConfig(objective="comm", comm_dim=16, comm_out=8, batch_size=64, max_steps=12, eval_every=4,
                      patience=100)
    res = train_comm(xi, xt, np.arange(128), np.arange(128, 160), cfg)
    assert res.steps_taken == 12 and res.stopped_reason == "max_steps"
    assert res.lambda_at_best == 0.0
    f = fused_features(res.model, xi, xt)
    assert f.shape == (160, 16) and f.dtype == np.float32 and np.isfinite(f).all()
    path = save_heads(tmp_path / "comm.safetensors", res)
    again = load_heads(path)
    assert isinstance(again, CommModel)
    assert np.array_equal(fused_features(again, xi, xt), f)


def test_final_layernorm_before_cls_is_there_and_trained():
    """As the original models/mmfusion.py: the fused CLS output goes through a final LayerNorm, whose weights
    train; a model saved before it existed (config without final_norm) rebuilds without it."""
    from stratalign.core.heads import build_model

    torch.manual_seed(0)
    model = CommModel(10, 6, dim=32, heads=8)
    assert isinstance(model.ln_f, torch.nn.LayerNorm) and model.config["options"]["final_norm"] is True
    xi, xt = torch.randn(7, 10) * 5 + 3, torch.randn(7, 6)
    with torch.no_grad():
        fused = model.fuse(xi, xt)  # at init the LayerNorm's affine is the identity: rows of mean 0, std 1
    assert torch.allclose(fused.mean(1), torch.zeros(7), atol=1e-5)
    assert torch.allclose(fused.var(1, unbiased=False), torch.ones(7), atol=1e-3)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((96, 10)).astype(np.float32), rng.standard_normal((96, 6)).astype(np.float32)
    cfg = TrainConfig(objective="comm", comm_dim=16, comm_out=8, comm_heads=2, batch_size=32, max_steps=6,
                      eval_every=2, patience=100)
    assert cfg.comm_final_norm is True
    trained = train_comm(a, b, np.arange(64), np.arange(64, 96), cfg).model
    assert not torch.allclose(trained.ln_f.weight, torch.ones(16))  # it is trained, not a fixed normalisation
    old = {k: v for k, v in model.config["options"].items() if k != "final_norm"}
    legacy = build_model({"type": "comm", "options": old})
    assert isinstance(legacy.ln_f, torch.nn.Identity)
    legacy.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ln_f.")}, strict=True)
    unnormed = TrainConfig(objective="comm", comm_final_norm=False)
    assert unnormed.comm_final_norm is False and "comm_final_norm" not in unnormed.to_dict()
