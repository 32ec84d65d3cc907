"""The lean step's losses (issue 30): `clip_loss_stacked` and `structure_regularizer_given` have hand-written
backwards; their gradients pass torch's gradcheck in float64, and in float32 they equal `clip_loss` and
`structure_regularizer` (levels 1, every centering and JS form), values and gradients, up to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stratalign.core import losses, losses_lean
from stratalign.errors import StratalignError


def _stack(dtype: torch.dtype, s: int = 3, b: int = 12, d_in: int = 10, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, d_in, generator=g).to(dtype)
    zi = F.normalize(torch.randn(s, b, d, generator=g), dim=-1).to(dtype).requires_grad_()
    zt = F.normalize(torch.randn(s, b, d, generator=g), dim=-1).to(dtype).requires_grad_()
    return x, zi, zt


def _frozen(x: torch.Tensor, tau: float, centering: str) -> tuple[torch.Tensor, torch.Tensor]:
    xh = F.normalize(x, dim=-1)
    xc = xh - xh.mean(-2, keepdim=True) if centering == "mean" else xh
    return losses_lean.frozen_affinity((xc / tau) @ xc.mT) if x.dtype == torch.float32 else _softmax_e(xc, tau)


def _softmax_e(xc: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax((xc / tau) @ xc.mT, -1)
    return p, p + losses.EPS_LOG


@pytest.mark.parametrize("centering", ["mean", "none"])
@pytest.mark.parametrize("js", ["reference", "textbook"])
@pytest.mark.parametrize("unit", [False, True])
def test_structure_given_gradient_passes_gradcheck(centering: str, js: str, unit: bool) -> None:
    x, z, _ = _stack(torch.float64)
    p_x, px_e = _frozen(x, 0.3, centering)
    def fn(zz: torch.Tensor) -> torch.Tensor:
        return losses_lean._StructureGiven.apply(zz, p_x, px_e, 0.3, centering == "mean", js == "reference", unit)

    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("tau", [0.3, 0.005])  # 0.005: logits spread past one shift per run (the logsumexp path)
def test_clip_stacked_gradient_passes_gradcheck(tau: float) -> None:
    _, zi, zt = _stack(torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: losses_lean._ClipStacked.apply(a, b, tau), (zi, zt))


@pytest.mark.parametrize("centering", ["mean", "none"])
@pytest.mark.parametrize("js", ["reference", "textbook"])
def test_structure_given_equals_structure_regularizer(centering: str, js: str) -> None:
    x, z, _ = _stack(torch.float32, b=32, d_in=24, d=16)
    ref = losses.structure_regularizer(x, z, tau=0.05, centering=centering, js=js)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    got = losses_lean.structure_regularizer_given(*_frozen(x, 0.05, centering), z, tau=0.05, centering=centering, js=js)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max()))


@pytest.mark.parametrize("tau", [0.05, 0.01])  # 0.01: the logsumexp path (logits spread ~150)
def test_clip_stacked_equals_clip_loss(tau: float) -> None:
    _, zi, zt = _stack(torch.float32, b=32, d=16)
    ref = losses.clip_loss(zi, zt, tau)
    g_ref = torch.autograd.grad(ref.sum(), (zi, zt))
    got = losses_lean.clip_loss_stacked(zi, zt, tau)
    g_got = torch.autograd.grad(got.sum(), (zi, zt))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_ref):  # the gradients scale as 1 / tau
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * 0.05 / tau)


def test_lean_losses_refuse_other_shapes() -> None:
    x, z, _ = _stack(torch.float32)
    p_x, px_e = _frozen(x, 0.05, "mean")
    with pytest.raises(StratalignError, match="structure_regularizer_given"):
        losses_lean.structure_regularizer_given(p_x, px_e, z[0])
    with pytest.raises(StratalignError, match="clip_loss_stacked"):
        losses_lean.clip_loss_stacked(z[0], z[0])


def _structure_f64(x: torch.Tensor, z: torch.Tensor, tau: float, centering: str, js: str) -> torch.Tensor:
    """R_S at level 1 in float64 (structure_regularizer casts to float32)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        h = F.normalize(t, dim=-1)
        return h - h.mean(-2, keepdim=True) if centering == "mean" else h

    xc, zc = rows(x), rows(z)
    return losses._divergence(torch.softmax(xc @ xc.mT / tau, -1), torch.softmax(zc @ zc.mT / tau, -1), js)


@pytest.mark.parametrize("centering", ["mean", "none"])
@pytest.mark.parametrize("js", ["reference", "textbook"])
def test_structure_given_gradient_is_as_near_float64_as_structure_regularizer(centering: str, js: str) -> None:
    """Where P_Z is near 1 (a run's own row), the reference form's terms near 1 must cancel before the softmax's
    backward: taken apart they cost the gradient ~5x the float32 rounding of structure_regularizer."""
    x, z, _ = _stack(torch.float32, b=32, d_in=24, d=16)
    z64 = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_structure_f64(x.double(), z64, 0.05, centering, js).sum(), z64)
    ref = losses.structure_regularizer(x, z, tau=0.05, centering=centering, js=js)
    got = losses_lean.structure_regularizer_given(*_frozen(x, 0.05, centering), z, tau=0.05, centering=centering, js=js)
    off = [float((torch.autograd.grad(v.sum(), z)[0].double() - want).abs().max()) for v in (ref, got)]
    assert off[1] <= 2 * off[0] + 1e-9 * float(want.abs().max())
