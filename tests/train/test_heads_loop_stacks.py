"""One content per run id (issue 29, item 4): a run's weights are bit-identical whether it trains alone or in stacks of
3 and 4, at any place in the stack and beside runs of other objectives, at sizes where torch splits reductions
across threads (rows x width >= 32,768: the residual gate's gradient, a (S,)-shaped sum, was split that way when
S = 1 and not when S > 1, and a run alone differed from itself stacked by ~1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.train import RunSpec, TrainConfig, train_heads, train_many

BASE = dict(dim=256, batch_size=256, max_steps=12, eval_every=4, lr=1e-2, tau=0.1, warmup_steps=4, patience=100,
            device="cpu")


def _pairs(n: int = 420, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, 8))
    xi = s @ rng.standard_normal((8, 48)) + 0.5 * rng.standard_normal((n, 48))
    xt = s @ rng.standard_normal((8, 40)) + 0.5 * rng.standard_normal((n, 40))
    return xi.astype(np.float32), xt.astype(np.float32)


def _spec(objective: str, head: str, seed: int, **knobs) -> RunSpec:
    opts = {"linear": {}, "mlp": {"hidden": 64, "dropout": 0.1}, "residual": {"rank": 16, "dropout": 0.1}}[head]
    cfg = TrainConfig(objective=objective, head=head, head_options=opts, seed=seed, **{**BASE, **knobs})
    return RunSpec(cfg, np.arange(seed * 20, seed * 20 + 300), np.arange(360, 420))


def _bytes(result) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("head", ["linear", "residual", "mlp"])
def test_a_run_alone_equals_itself_in_stacks_of_3_and_4(head: str) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no reduction is split, nothing to tell apart")
    xi, xt = _pairs()
    target = _spec("clip+structure", head, 0, lam=10.0)
    alone = train_heads(xi, xt, target.train_idx, target.val_idx, target.cfg)
    others = [_spec("clip+structure", head, 1, lam=3.0), _spec("clip+ib", head, 2, beta=1.0),
              _spec("clip+structure", head, 3, lam=30.0)]
    for stack in ([others[0], target, others[1]], [others[0], others[1], others[2], target]):
        got = train_many(xi, xt, stack)[stack.index(target)]
        assert "trained in a batch of" in got.message
        assert got.best_step == alone.best_step and got.val_curve == alone.val_curve
        assert _bytes(got) == _bytes(alone), (len(stack), head)


def _steps(head: str, seeds: list[int], target: int, steps: int = 4) -> list[dict[str, bytes]]:
    """The target run's gradients and weights after each of `steps` optimiser steps of a GroupLoop over `seeds`."""
    from stratalign.train.heads_init import init_run_heads as _init
    from stratalign.train.heads_loop import GroupLoop, HeadsJob
    from stratalign.train.rules import SelectionRule
    from stratalign.train.validation import ValidationTargets

    xi, xt = (torch.from_numpy(a) for a in _pairs())
    dev = torch.device("cpu")
    jobs = [HeadsJob(_spec("clip+structure", head, s).cfg, np.arange(300), np.arange(360, 420),
                     ValidationTargets.pairs_only(60), SelectionRule("rsum", "rsum", True)) for s in seeds]
    built = [_init(j.cfg, 48, 40, dev) for j in jobs]
    loop = GroupLoop(xi, xt, jobs, [m for m, _ in built], [g for _, g in built], dev)
    slot = seeds.index(target)
    out = []
    for k in range(steps):
        loop.step(k)
        stacks = {**{f"image.{n}": t for n, t in loop.image.weights.items()},
                  **{f"text.{n}": t for n, t in loop.text.weights.items()}}
        out.append({n: t.grad[slot].numpy().tobytes() + t.detach()[slot].numpy().tobytes() for n, t in stacks.items()})
    return out


@pytest.mark.parametrize("head", ["linear", "residual", "mlp"])
def test_each_step_of_a_run_is_the_same_alone_and_stacked(head: str) -> None:
    """Bytes of every gradient and weight after every step (AdamW's first steps hide a last-bit change of a
    gradient: sign-like updates; this sees it at once)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no reduction is split, nothing to tell apart")
    alone = _steps(head, [0], 0)
    for seeds in ([1, 0, 2], [1, 2, 3, 0]):
        assert _steps(head, seeds, 0) == alone, (head, seeds)
