"""METHOD 3.6: losses and regularisers are computed in float32 under any autocast, on every device. Under CPU bf16
autocast each loss of bf16 head outputs must equal, bit for bit, the same loss taken without autocast on those
outputs cast to float32 (before the fix, `x.float() @ y.float().mT` and its softmax ran in bf16 under autocast).
The same check runs under CUDA autocast when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from stratalign.core import losses, losses_lean
from stratalign.core.comm import nt_xent

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(device: str, b: int = 24, d_in: int = 20, d: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d_in, generator=g).to(device)  # frozen inputs: float32, as the trainer keeps them
    zi = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(device).bfloat16()  # head outputs
    zt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(device).bfloat16()
    return x, zi, zt


def _frozen_logits(x: torch.Tensor) -> torch.Tensor:
    """The frozen side's logits as the trainer makes them: in float32 (train.frozen_side turns autocast off)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x @ x.mT


def _cases(x: torch.Tensor, zi: torch.Tensor, zt: torch.Tensor):
    nbr_x, nbr_z = x[:6] * 1.5, zi[:6]
    index = torch.arange(x.shape[0] * 2, device=x.device).view(-1, 2) % 6
    mask = torch.ones(x.shape[0], 2, dtype=torch.bool, device=x.device)
    return {
        "clip": lambda: losses.clip_loss(zi, zt, 0.05),
        "clip_stacked": lambda: losses.clip_loss(zi.view(2, -1, zi.shape[-1]), zt.view(2, -1, zt.shape[-1]), 0.05),
        "structure": lambda: losses.structure_regularizer(x, zi, tau=0.05, levels=2),
        "structure_stacked": lambda: losses.structure_regularizer(x.view(2, -1, x.shape[-1]),
                                                                  zi.view(2, -1, zi.shape[-1]), tau=0.05),
        "structure_knn": lambda: losses.structure_regularizer_knn(x, zi, nbr_x, nbr_z, mask, tau=0.05,
                                                                  nbr_index=index),
        "ib": lambda: losses.ib_deterministic(zi, zt),
        "vib": lambda: losses.vib_kl(zi, zt, zt, zi),
        "nt_xent": lambda: nt_xent(zi, zt, 0.1),
        "clip_lean": lambda: losses_lean.clip_loss_stacked(zi.view(2, -1, zi.shape[-1]), zt.view(2, -1, zt.shape[-1]), 0.05),
        "structure_given": lambda: losses_lean.structure_regularizer_given(
            *losses_lean.frozen_affinity(_frozen_logits(x.view(2, -1, x.shape[-1]))),
            zi.view(2, -1, zi.shape[-1]), tau=0.05),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_cases(*_inputs("cpu"))))
def test_losses_are_float32_under_bf16_autocast(device: str, name: str) -> None:
    x, zi, zt = _inputs(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = _cases(x, zi, zt)[name]()
    want = _cases(x, zi.float(), zt.float())[name]()  # no autocast: float32 throughout
    assert got.dtype == torch.float32
    assert torch.equal(got, want), (name, got, want)


def test_float32_keeps_gradients_flowing_to_bf16_inputs() -> None:
    """The loss is float32, and its gradient reaches a head whose matmul ran under autocast."""
    w = torch.randn(12, 20, requires_grad=True)
    x, _, zt = _inputs("cpu")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        zi = torch.nn.functional.normalize(x @ w.T, dim=-1)
        assert zi.dtype == torch.bfloat16
        loss = losses.clip_loss(zi, zt) + losses.structure_regularizer(x, zi)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad is not None and torch.isfinite(w.grad).all()
