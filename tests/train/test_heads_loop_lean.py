"""The lean step of bf16 runs (issue 30): the same GroupLoop with the hand-written CLIP and R_S and the frozen side from
the Gram matrix gives the losses of the plain step up to float rounding, and two runs that share batches (one seed,
one training subset) train as they do with the plain step; fp32 runs never take it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.device import bf16_supported
from stratalign.train import TrainConfig
from stratalign.train.heads_init import init_run_heads
from stratalign.train.heads_loop import GroupLoop, HeadsJob
from stratalign.train.rules import SelectionRule
from stratalign.train.validation import ValidationTargets


def _loop(precision: str, lean: bool, lams: tuple[float, ...] = (10.0, 3.0), seeds: tuple[int, ...] = (0, 1),
          head: str = "linear") -> GroupLoop:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((200, 6))
    xi = torch.from_numpy((s @ rng.standard_normal((6, 32)) + 0.5 * rng.standard_normal((200, 32))).astype(np.float32))
    xt = torch.from_numpy((s @ rng.standard_normal((6, 24)) + 0.5 * rng.standard_normal((200, 24))).astype(np.float32))
    dev = torch.device("cpu")
    jobs = [HeadsJob(TrainConfig(objective="clip+structure", dim=16, batch_size=64, max_steps=50, warmup_steps=1,
                                 lam=lam, seed=seed, device="cpu", precision=precision, head=head),
                     np.arange(150), np.arange(150, 200), ValidationTargets.pairs_only(50),
                     SelectionRule("rsum", "rsum", True)) for lam, seed in zip(lams, seeds)]
    built = [init_run_heads(j.cfg, 32, 24, dev) for j in jobs]
    loop = GroupLoop(xi, xt, jobs, [m for m, _ in built], [g for _, g in built], dev)
    assert loop.lean == (precision == "bf16")
    if not lean:
        loop.lean, loop.frozen = False, None
    return loop


def test_fp32_runs_take_the_plain_step() -> None:
    assert not _loop("fp32", True).lean


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bf16")
@pytest.mark.parametrize("seeds, head", [((0, 1), "linear"), ((3, 3), "linear"), ((0, 1), "mlp"), ((0, 1), "residual")])
def test_lean_step_equals_the_plain_step_up_to_rounding(seeds: tuple[int, int], head: str) -> None:
    lean, plain = _loop("bf16", True, seeds=seeds, head=head), _loop("bf16", False, seeds=seeds, head=head)
    for step in range(4):
        got, want = lean.step(step), plain.step(step)  # (S, 3): loss, clip, reg of each run
        assert bool((want[:, 2] > 0).all()) or step == 0
        # bf16 rounding from the first step: the lean step normalises the heads' rows in float32, the plain one in bf16
        # (an mlp's bf16 hidden layer puts either ~5e-3 from the fp32 step)
        torch.testing.assert_close(got, want, rtol=1e-2 if head == "mlp" else 2e-3, atol=1e-6)
    lr = lean.cfg.lr
    for side in ("image", "text"):
        for name, w in getattr(lean, side).weights.items():
            # AdamW moves a weight by about lr a step whatever its gradient's size: a component near 0 whose rounding
            # differs moves by up to 2 lr, the others stay together
            off = (w.detach() - getattr(plain, side).weights[name].detach()).abs()
            assert float(off.max()) <= 4 * 2 * lr and float((off > lr).float().mean()) <= 0.01


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bf16")
def test_lean_gradients_are_nearer_fp32_than_the_plain_steps() -> None:
    """The lean step normalises the rows and sums the bias's gradient in float32: its gradients are nearer those of
    the fp32 step than the plain bf16 step's are."""
    def grads(loop: GroupLoop) -> list[torch.Tensor]:
        loop.step(5)
        return [w.grad.clone() for side in ("image", "text") for w in getattr(loop, side).weights.values()]

    ref, lean, plain = grads(_loop("fp32", False)), grads(_loop("bf16", True)), grads(_loop("bf16", False))
    for r, a, b in zip(ref, lean, plain):
        assert float((a - r).norm()) < float((b - r).norm()) < 0.05 * float(r.norm())
