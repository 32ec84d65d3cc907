"""The batched trainer: a run trained in a group equals the same run trained alone (1e-5, fp32, CPU).

Groups mix seeds, subset sizes (one effective batch, different epoch lengths), knob values, objectives
and patience (runs stop at different steps); fallback objectives train one by one; a sweep equals one
train_run per cell.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_stage import _cfg, stage_store  # noqa: F401 (module fixture reused)

from stratalign.core.objectives import REGISTRY, objective_named
from stratalign.train import RunSpec, TrainConfig, train_comm, train_heads, train_many
from stratalign.train.batched import group_key

SMALL = dict(dim=16, batch_size=32, lr=1e-2, max_steps=60, eval_every=5, warmup_steps=10, device="cpu")


def _planted(n: int = 400, d: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xi = rng.standard_normal((n, d)).astype(np.float32)
    xt = (xi @ rng.standard_normal((d, d)) + 30.0 * rng.standard_normal((n, d))).astype(np.float32)
    return xi, xt


def _runs(objectives: list[str], head: str = "linear", opts: dict | None = None) -> list[RunSpec]:
    """Runs of one group: seeds, subset sizes 40..120 (b = 32 for all), lam and patience differ."""
    out = []
    for i, obj in enumerate(objectives):
        for j, (n, lam, patience) in enumerate(((40, 10.0, 5), (120, 2.0, 60), (75, 5.0, 15))):
            cfg = TrainConfig(objective=obj, head=head, head_options=opts or {}, seed=3 * i + j, lam=lam,
                              beta=0.01 * (j + 1), patience=patience, **SMALL)
            start = 20 * j
            out.append(RunSpec(cfg, np.arange(start, start + n), np.arange(300, 340 + 10 * j)))
    return out


def _assert_same(batched, alone) -> None:
    assert batched.best_step == alone.best_step and batched.steps_taken == alone.steps_taken
    assert batched.stopped_reason == alone.stopped_reason and batched.message == alone.message
    assert batched.best_val_clip == pytest.approx(alone.best_val_clip, abs=1e-5)
    sa, sb = batched.model.state_dict(), alone.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=0), (k, (sa[k] - sb[k]).abs().max())
    assert len(batched.history) == len(alone.history)
    for ha, hb in zip(batched.history, alone.history):
        assert ha.keys() == hb.keys()
        for f in ("loss", "clip", "reg", "val_clip", "lr", "lambda"):
            if f in ha:
                assert ha[f] == pytest.approx(hb[f], rel=1e-5, abs=1e-5), (f, ha["step"])


BATCHING = [o.name for o in REGISTRY if o.batches]


@pytest.mark.parametrize("objective", BATCHING)
def test_batched_equals_alone_for_every_batching_objective(objective: str) -> None:
    xi, xt = _planted()
    runs = _runs([objective])
    batched = train_many([(xi, xt)], runs)
    assert all(r.group_size == len(runs) for r in batched)  # one group
    for spec, res in zip(runs, batched):
        _assert_same(res, train_heads(xi, xt, spec.train_idx, spec.val_idx, spec.cfg))
    steps = {r.steps_taken for r in batched}
    assert len(steps) > 1, "runs of the group must stop at different steps"
    stopped_early = [r for r in batched if r.stopped_reason == "early_stopping"]
    assert stopped_early and max(steps) > min(r.steps_taken for r in stopped_early)


def test_mixed_objectives_and_mlp_heads_with_dropout_batch_together() -> None:
    """clip, clip+structure and clip+ib in one group of mlp heads (dropout draws from each run's stream)."""
    xi, xt = _planted()
    runs = _runs(["clip", "clip+structure", "clip+ib"], head="mlp", opts={"hidden": 32, "dropout": 0.2})
    batched = train_many([(xi, xt)], runs)
    assert {r.group_size for r in batched} == {len(runs)}
    for spec, res in zip(runs, batched):
        _assert_same(res, train_heads(xi, xt, spec.train_idx, spec.val_idx, spec.cfg))


def test_an_early_stopped_run_keeps_its_checkpoint_while_others_go_on() -> None:
    xi, xt = _planted()
    runs = _runs(["clip"])
    res = train_many([(xi, xt)], runs)
    early, late = res[0], res[1]
    assert early.stopped_reason == "early_stopping" and early.steps_taken < late.steps_taken
    assert early.best_step == early.steps_taken - runs[0].cfg.patience
    assert early.history[-1]["step"] == early.steps_taken  # nothing recorded after it stopped


def test_groups_split_on_what_must_agree() -> None:
    a = TrainConfig(objective="clip", **SMALL)
    b = TrainConfig(objective="clip+structure", seed=4, lam=3.0, patience=9, **SMALL)
    assert group_key(a, 100, (8, 8), "cpu") == group_key(b, 200, (8, 8), "cpu")
    assert group_key(a, 100, (8, 8), "cpu") != group_key(a, 20, (8, 8), "cpu")  # b = 32 vs 20
    assert group_key(a, 100, (8, 8), "cpu") != group_key(TrainConfig(**{**SMALL, "lr": 3e-2}), 100, (8, 8), "cpu")
    vib = TrainConfig(objective="clip+vib", **SMALL)
    assert group_key(a, 100, (8, 8), "cpu") != group_key(vib, 100, (8, 8), "cpu")


def test_fallback_objective_trains_alone_with_the_same_result() -> None:
    assert not objective_named("comm").batches and not objective_named("csa").batches
    xi, xt = _planted(200, 12)
    cfg = TrainConfig(objective="comm", comm_dim=16, comm_out=8, comm_heads=2, dim=8, batch_size=32, max_steps=15,
                      eval_every=5, device="cpu")
    specs = [RunSpec(cfg, np.arange(100), np.arange(150, 200)),
             RunSpec(TrainConfig(objective="clip", **SMALL), np.arange(100), np.arange(150, 200))]
    got = train_many([(xi, xt)], specs)
    alone = train_comm(xi, xt, np.arange(100), np.arange(150, 200), cfg)
    sa, sb = got[0].model.state_dict(), alone.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and got[0].best_step == alone.best_step
    assert got[1].group_size == 1


def test_sweep_equals_one_train_run_per_cell(stage_store, monkeypatch) -> None:  # noqa: F811
    from dataclasses import replace

    import stratalign.stages.sweep as sweep_mod
    from stratalign.stages.run_config import resolve_run
    from stratalign.stages.sweep import SweepConfig, run_sweep
    from stratalign.stages.train import train_run
    from stratalign.store.runs import RunRegistry

    base = _cfg(options=(("max_steps", 40), ("patience", 10), ("eval_every", 5), ("warmup_steps", 10), ("dim", 16),
                         ("batch_size", 16)))
    cfg = SweepConfig(base=base, n_pairs=(30, 50), seeds=(0, 1), objectives=("clip", "clip+structure-knn", "csa"),
                      layer_rules=("last",))
    sizes: list[int] = []
    real = sweep_mod.train_runs

    def spy(*a, **k):
        out = real(*a, **k)
        sizes.extend(m["train_group_size"] for m in out)
        return out

    monkeypatch.setattr(sweep_mod, "train_runs", spy)
    sweep = run_sweep(stage_store, cfg, None, progress=False)
    assert len(sizes) == len(cfg.cells()) and max(sizes) > 1  # the sweep really batched
    assert sweep.trained == len(cfg.cells())
    swept = RunRegistry(stage_store)
    # the cells again, one train_run each (forced), into the same store: compare before and after
    before = {rid: (swept.metrics(rid), swept.load(rid)[1]) for rid in sweep.run_ids}
    for cell in cfg.cells():
        run = resolve_run(stage_store, replace(cell))
        one = train_run(stage_store, cell, resolved=run, force=True)
        met, tensors = before[run.run_id]
        again = swept.load(run.run_id)[1]
        for k in tensors:
            assert torch.allclose(tensors[k].float(), again[k].float(), atol=1e-5, rtol=0), k
        # the training facts are equal; test metrics are equal where the weights are (argmax ties of the toy
        # encoders' features can flip a zero-shot or retrieval hit on a 1e-7 weight difference)
        for k in ("best_step", "steps_taken", "stopped_reason", "n_train"):
            assert one.get(k) == met.get(k), (cell.objective, k)
        if "best_val_clip" in met:
            assert one["best_val_clip"] == pytest.approx(met["best_val_clip"], abs=1e-5)
            assert np.allclose(np.array(one["val_curve"], float), np.array(met["val_curve"], float), atol=1e-5)
        if all(torch.equal(tensors[k], again[k]) for k in tensors):
            assert all(one[k] == pytest.approx(v, abs=1e-9) for k, v in met.items()
                       if isinstance(v, float) and "seconds" not in k)
