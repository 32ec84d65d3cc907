"""train.optim: the per-run clip equals torch's clip_grad_norm_ per group, RunsAdamW follows torch's AdamW, state
follows the tensors a stack keeps, and training imports no torch._dynamo (torch.optim.Optimizer's constructor did)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from stratalign.train.optim import RunsAdamW, clip_per_run, clip_stacked_per_run

ROOT = Path(__file__).resolve().parents[2]


def _tensors(seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in ((16, 12), (16,), ()):
        p = torch.randn(shape, generator=g).requires_grad_()
        p.grad = scale * torch.randn(shape, generator=g)
        out.append(p)
    return out


def test_clip_per_run_equals_clip_grad_norm_per_group() -> None:
    groups = [_tensors(0, 10.0), _tensors(1, 1e-3), _tensors(2, 3.0)]
    ref = [[p.detach().clone().requires_grad_() for p in g] for g in groups]
    for g, r in zip(groups, ref):
        for p, q in zip(g, r):
            q.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(r, 1.0)
    clip_per_run(groups, 1.0)
    for g, r in zip(groups, ref):
        for p, q in zip(g, r):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(groups[1][0].grad, ref[1][0].grad)  # under the bound: untouched


def test_stacked_clip_equals_clip_grad_norm_per_run() -> None:
    """Three runs' stacked gradients (a weight, a bias, a gate): each run clipped by its own norm over its slices."""
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([10.0, 1e-3, 3.0])
    stacked = [scales.view(-1, *[1] * len(shape)) * torch.randn(3, *shape, generator=g) for shape in ((16, 12), (16,), ())]
    want = []
    for s in range(3):
        run = [t[s].clone().requires_grad_() for t in stacked]
        for p, t in zip(run, stacked):
            p.grad = t[s].clone()
        torch.nn.utils.clip_grad_norm_(run, 1.0)
        want.append([p.grad for p in run])
    clip_stacked_per_run([stacked], 1.0)
    for s in range(3):
        for t, w in zip(stacked, want[s]):
            torch.testing.assert_close(t[s], w, rtol=1e-6, atol=1e-9)
    assert float(torch.linalg.vector_norm(torch.cat([t[0].flatten() for t in stacked]))) <= 1.0 + 1e-5


def test_runs_adamw_follows_torch_adamw_and_keeps_state() -> None:
    ours, ref = _tensors(0, 1.0), _tensors(0, 1.0)
    opt = RunsAdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4)
    for step in range(5):
        g = torch.Generator().manual_seed(10 + step)
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    before = opt.state[ours[0]]
    opt.keep(ours[:1])
    assert opt.params == ours[:1] and opt.state[ours[0]] is before and len(opt.state) == 1


def test_training_does_not_import_dynamo() -> None:
    code = ("import sys, numpy as np\n"
            "from stratalign.train import TrainConfig, train_heads\n"
            "x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)\n"
            "train_heads(x, x, np.arange(40), np.arange(40, 60), TrainConfig(objective='clip+structure', dim=8, "
            "batch_size=16, max_steps=4, eval_every=2, warmup_steps=2, device='cpu'))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_stacked_runs_step_as_their_own_tensors_and_keep_their_rows() -> None:
    """Stacked tensors (dim 0 = runs): every run's slice steps bit for bit as that run's own tensor, and `keep(rows)`
    carries the kept runs' state. (A residual gate's one-element slices stepped in the kernel's vector part moved by
    1.5e-8: tests/train/test_heads_loop.py::test_batched_runs_equal_runs_alone caught it; they step alone now.)"""
    g = torch.Generator().manual_seed(3)
    stacked = [torch.randn(20, 8, 8, generator=g).requires_grad_(), torch.randn(20, generator=g).requires_grad_()]  # 20 gates: 16 in the vector part
    alone = [[t.detach()[s].clone().requires_grad_() for t in stacked] for s in range(20)]
    opt = RunsAdamW(stacked, lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4, stacked=True)
    opts = [RunsAdamW(a, lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4) for a in alone]
    for step in range(8):
        for t in stacked:
            t.grad = torch.randn(t.shape, generator=g)
        for s, a in enumerate(alone):
            for t, u in zip(stacked, a):
                u.grad = t.grad[s].clone()
        opt.step()
        for o in opts:
            o.step()
        if step == 1:
            rows = [3, 7, 19]
            kept = [t.detach()[rows].clone().requires_grad_() for t in stacked]
            opt.keep(kept, rows)
            stacked, alone, opts = kept, [alone[s] for s in rows], [opts[s] for s in rows]
    for s, a in enumerate(alone):
        for t, u in zip(stacked, a):
            assert torch.equal(t.detach()[s], u.detach())
