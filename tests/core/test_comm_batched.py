"""CoMM's batched step (both views in one pass of the block, only the CLS row computed, the 6 (view, mask) groups
in one projection) gives the numbers of the per-view loop of docs/method.md § 3.5 (tests/comm_reference.py): the
fused outputs, the loss, every gradient and the BatchNorm running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from comm_reference import fuse_per_mask, step_loss_per_view

from stratalign.core.comm import MASKS, CommModel, comm_step_loss


def _model(seed: int = 0, **kw) -> CommModel:
    torch.manual_seed(seed)
    model = CommModel(20, 12, dim=32, heads=4, out_dim=16, **kw)
    with torch.no_grad():  # away from the init (LayerNorm affine = identity, zero biases) so every path shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("final_norm", [True, False])
def test_fuse_masks_equals_the_block_run_per_mask(final_norm):
    model = _model(final_norm=final_norm).eval()
    xi, xt = torch.randn(9, 20), torch.randn(9, 12)
    fused = model.fuse_masks(xi, xt)
    assert fused.shape == (3, 9, 32)
    for i, m in enumerate(MASKS):
        want = fuse_per_mask(model, xi, xt, m)
        assert torch.allclose(fused[i], want, atol=1e-5), m
        assert torch.allclose(model.fuse(xi, xt, m), want, atol=1e-5), m


def test_batched_step_gives_the_per_view_loss_gradients_and_running_stats():
    batched = _model(1).train()
    looped = copy.deepcopy(batched)
    xi, xt = torch.randn(16, 20), torch.randn(16, 12)
    si, st = xi.std(0, keepdim=True), xt.std(0, keepdim=True)
    for _ in range(2):  # twice: the running statistics move from moved values too
        got = comm_step_loss(batched, xi, xt, si, st, generator=torch.Generator().manual_seed(5))
        want = step_loss_per_view(looped, xi, xt, si, st, generator=torch.Generator().manual_seed(5))
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
        batched.zero_grad()
        looped.zero_grad()
        got.backward()
        want.backward()
        for (name, a), b in zip(batched.named_parameters(), looped.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
        for (name, a), b in zip(batched.named_buffers(), looped.buffers()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert int(batched.proj[1].num_batches_tracked) == 12  # 6 (view, mask) groups a step, as 6 calls
    batched.eval()
    looped.eval()
    with torch.no_grad():  # validation: BatchNorm on the running statistics
        got = comm_step_loss(batched, xi, xt, si, st, generator=torch.Generator().manual_seed(6))
        want = step_loss_per_view(looped, xi, xt, si, st, generator=torch.Generator().manual_seed(6))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
