"""Trainer: determinism, the early-stopping rules of docs/method.md § 3.8, NaN handling, storage, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stratalign.core.losses as losses_mod
from stratalign.core.heads import AlignedHeads, VariationalHead
from stratalign.errors import StratalignError
from stratalign.train import (
    TrainConfig,
    embed,
    fit_run,
    knn_graph,
    load_heads,
    make_heads,
    model_from_tensors,
    model_tensors,
    save_heads,
    train_heads,
)
from stratalign.train.optim import RunsAdamW


def _random(n=96, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def _planted(n=900, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, 8))
    xi = s @ rng.standard_normal((8, 24)) + 0.3 * rng.standard_normal((n, 24))
    xt = s @ rng.standard_normal((8, 20)) + 0.3 * rng.standard_normal((n, 20))
    return xi.astype(np.float16), xt.astype(np.float32)


SMALL = dict(dim=16, batch_size=32, max_steps=40, eval_every=5, patience=100, lr=1e-2, tau=0.1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_call_twice_is_bit_identical():
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", head="mlp", head_options={"hidden": 16, "dropout": 0.2},
                      warmup_steps=10, **{**SMALL, "max_steps": 20})
    a = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    b = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    sa, sb = _state(a.model), _state(b.model)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h.get("loss") for h in a.history] == [h.get("loss") for h in b.history]
    c = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                    TrainConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(_state(c.model)["image.net.0.weight"], sa["image.net.0.weight"])


def test_every_evaluation_step_is_a_candidate_warmup_or_not():
    """docs/method.md § 3.8 (2026-12-06): one candidate set for every run. Random pairs overfit at once, so the validation
    CLIP loss is lowest inside the warm-up; the structure run restores that step as plain CLIP does."""
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", warmup_steps=20, select="clip_loss", **SMALL)
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    vals = {h["step"]: h["val_clip"] for h in res.history if "val_clip" in h}
    assert sorted(vals) == list(range(0, 41, 5)), "the evaluation steps are those of every run (no extra one)"
    assert min(vals, key=vals.get) < 20 and res.best_step == min(vals, key=vals.get)
    assert res.lambda_at_best == res.history[res.best_step]["lambda"] == losses_mod.lambda_at(res.best_step - 1, 10.0, 20)
    assert res.best_val_clip == vals[res.best_step] and not res.restored_before_warmup
    assert res.summary()["selection"]["first_candidate"] == 0
    plain = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                        TrainConfig(objective="clip", select="clip_loss", **SMALL))
    assert sorted(h["step"] for h in plain.history if "val_clip" in h) == sorted(vals)


def test_runs_recorded_under_the_older_rule_keep_it():
    """A record without `candidates` is a run of the older rule (no candidate before the warm-up ends, an extra
    evaluation at its end): read back, it trains exactly as it did, so its run id still means its weights."""
    xi, xt = _random()
    new = TrainConfig(objective="clip+structure", warmup_steps=20, select="clip_loss", **SMALL)
    assert new.to_dict()["candidates"] == "all"
    old = TrainConfig.from_dict({k: v for k, v in new.to_dict().items() if k != "candidates"})
    assert old.candidates == "after_warmup" and old.selection_floor() == 20
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), old)
    vals = {h["step"]: h["val_clip"] for h in res.history if "val_clip" in h}
    assert 20 in vals and min(vals, key=vals.get) < 20
    assert res.best_step == min((s for s in vals if s >= 20), key=lambda s: vals[s])
    assert res.summary()["selection"]["first_candidate"] == 20
    # without a warm-up the two rules are one: nothing is recorded, older ids stay
    assert "candidates" not in TrainConfig(objective="clip", **SMALL).to_dict()


def test_a_fixed_stop_step_restores_that_step():
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", warmup_steps=20, stop_step=15, **SMALL)
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    free = train_heads(xi, xt, np.arange(64), np.arange(64, 96), TrainConfig(**{**cfg.__dict__, "stop_step": None}))
    assert res.best_step == 15 and res.steps_taken == 15 and res.stopped_reason == "fixed_step"
    # the same trajectory as the free run up to that step (the schedule is max_steps', not stop_step's)
    free_losses = {h["step"]: h.get("loss") for h in free.history}
    assert all(h.get("loss") == free_losses[h["step"]] for h in res.history)
    with pytest.raises(StratalignError, match="stop_step"):
        TrainConfig(stop_step=SMALL["max_steps"] + 1, **SMALL)


def test_warmup_fraction_and_patience():
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", warmup_fraction=0.25, **{**SMALL, "patience": 10})
    assert cfg.resolved_warmup() == 10
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    assert res.warmup_steps == 10
    assert res.stopped_reason == "early_stopping" and res.steps_taken == res.best_step + 10
    # the lambda recorded per step is the warm-up ramp by optimiser steps
    full = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg.__class__(**{**cfg.__dict__, "patience": 100}))
    lam = {h["step"]: h["lambda"] for h in full.history if "lambda" in h}
    assert lam[1] == 0.0 and lam[6] == pytest.approx(5.0) and lam[11] == 10.0


def test_bad_config_and_inputs():
    with pytest.raises(StratalignError, match="objective"):
        TrainConfig(objective="clip+magic")
    with pytest.raises(StratalignError, match="warm-up"):
        TrainConfig(objective="clip+structure", max_steps=100, warmup_steps=1000)
    with pytest.raises(StratalignError, match="js"):
        TrainConfig(js="forward")
    assert TrainConfig(**{"betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    xi, xt = _random()
    cfg = TrainConfig(**SMALL)
    with pytest.raises(StratalignError, match="overlap"):
        train_heads(xi, xt, np.arange(64), np.arange(60, 96), cfg)
    with pytest.raises(StratalignError, match="rows"):
        train_heads(xi, xt[:50], np.arange(40), np.arange(40, 50), cfg)
    with pytest.raises(StratalignError, match="outside"):
        train_heads(xi, xt, np.arange(64), np.arange(64, 200), cfg)
    bad = xi.copy()
    bad[3, 2] = np.nan
    with pytest.raises(StratalignError, match="NaN"):
        train_heads(bad, xt, np.arange(64), np.arange(64, 96), cfg)


def _nan_from_step(monkeypatch, step: int) -> None:
    """Make the training CLIP loss NaN from the `step`-th optimiser step on (validation stays finite)."""
    real = losses_mod.clip_loss
    calls = {"n": 0}

    def flaky(zi, zt, tau=0.05):
        out = real(zi, zt, tau)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= step:
                return out * float("nan")
        return out

    monkeypatch.setattr(losses_mod, "clip_loss", flaky)


def test_nan_loss_stops_and_keeps_best(monkeypatch):
    xi, xt = _random()
    _nan_from_step(monkeypatch, 13)
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), TrainConfig(objective="clip", **SMALL))
    assert res.stopped_reason == "non_finite" and "non-finite" in res.message
    assert res.steps_taken == 13 and res.history[-1]["step"] == 13 and math.isnan(res.history[-1]["loss"])
    assert res.best_step <= 10
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_save_load_round_trip(tmp_path):
    xi, xt = _random()
    for objective, head, opts in [("clip", "residual", {"rank": 4}), ("clip+vib", "linear", {})]:
        res = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                          TrainConfig(objective=objective, head=head, head_options=opts, **{**SMALL, "max_steps": 6}))
        path = save_heads(tmp_path / f"{objective}.safetensors", res)
        again = load_heads(path)
        assert isinstance(again, AlignedHeads)
        for modality, x in (("image", xi), ("text", xt)):
            assert torch.equal(embed(again, x, modality), embed(res.model, x, modality))
        via_tensors = model_from_tensors({}, model_tensors(res.model))
        assert torch.equal(embed(via_tensors, xi, "image"), embed(res.model, xi, "image"))
    assert (tmp_path / "clip.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    with pytest.raises(StratalignError):
        load_heads(tmp_path / "missing.safetensors")


def test_vib_embeds_mu():
    xi, xt = _random()
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                      TrainConfig(objective="clip+vib", **{**SMALL, "max_steps": 5}))
    head = res.model.image
    assert isinstance(head, VariationalHead)
    with torch.no_grad():
        mu, _ = head(torch.from_numpy(xi))
    assert torch.allclose(embed(res.model, xi, "image"), torch.nn.functional.normalize(mu, dim=1), atol=1e-6)
    assert all(math.isfinite(h["reg"]) for h in res.history[1:])


def test_knn_graph_excludes_self_and_matches_brute_force():
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    g = knn_graph(x, 5)
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xh @ xh.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1, kind="stable")[:, :5]
    assert g.shape == (40, 5) and (g != np.arange(40)[:, None]).all()
    assert np.array_equal(np.sort(g, 1), np.sort(want, 1))


def _r_at_1(model, xi, xt) -> float:
    zi, zt = embed(model, xi, "image"), embed(model, xt, "text")
    return float(((zi @ zt.T).argmax(1) == torch.arange(len(zi))).float().mean())


@pytest.mark.parametrize("objective", ["clip", "clip+structure", "clip+structure-knn", "clip+ib"])
def test_training_beats_random_heads_on_planted_relation(objective):
    xi, xt = _planted()
    cfg = TrainConfig(objective=objective, dim=32, batch_size=256, max_steps=60, eval_every=10, patience=1000,
                      warmup_steps=20, knn_k=5, tau=0.1)
    res, summary = train_heads(xi, xt, np.arange(600), np.arange(600, 700), cfg), None
    torch.manual_seed(0)
    random_heads = make_heads(cfg, 24, 20)
    test_i, test_t = xi[700:], xt[700:]
    trained, baseline = _r_at_1(res.model, test_i, test_t), _r_at_1(random_heads, test_i, test_t)
    assert trained > 0.3 and trained > 5 * max(baseline, 0.01), (trained, baseline)
    if objective.startswith("clip+structure"):
        assert res.best_step >= 20
    model, summary = fit_run(xi, xt, np.arange(600), np.arange(600, 700),
                             TrainConfig(**{**cfg.__dict__, "max_steps": 2, "warmup_steps": 1}))
    assert {"best_step", "lambda_at_best", "stopped_reason"} <= set(summary)


def test_knn_objective_with_k0_trains_like_batch_structure():
    xi, xt = _random()
    base = dict(warmup_steps=4, **{**SMALL, "max_steps": 8})
    a = train_heads(xi, xt, np.arange(64), np.arange(64, 96), TrainConfig(objective="clip+structure", **base))
    b = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                    TrainConfig(objective="clip+structure-knn", knn_k=0, **base))
    sa, sb = _state(a.model), _state(b.model)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert [h["reg"] for h in a.history[1:]] == pytest.approx([h["reg"] for h in b.history[1:]], rel=1e-6)


def test_defaults_equal_method_md():
    """docs/method.md § 3.1-3.8 defaults, field by field."""
    import inspect

    cfg = TrainConfig()
    assert cfg.lr == 1e-3 and cfg.betas == (0.9, 0.95) and cfg.weight_decay == 1e-4
    assert cfg.batch_size == 4096 and cfg.tau == 0.05 and cfg.lam == 10.0
    assert cfg.warmup_steps == 1000 and cfg.warmup_fraction is None and cfg.resolved_warmup() == 0
    assert TrainConfig(objective="clip+structure").resolved_warmup() == 1000
    assert cfg.knn_k == 10 and cfg.comm_tau == 0.1
    # beta and the VIB scale are the objective's (3.4): s = 0.05 for VIB; clip records the values older runs hold
    assert TrainConfig(objective="clip+vib").vib_scale == 0.05 and TrainConfig(objective="clip+ib").beta >= 0.1
    assert cfg.beta == 0.01 and cfg.vib_scale == 1.0
    assert cfg.dim == 512 and cfg.levels == 1 and cfg.weighting == "none" and cfg.js == "reference"
    assert inspect.signature(losses_mod.clip_loss).parameters["tau"].default == 0.05
    assert inspect.signature(losses_mod.structure_regularizer).parameters["tau"].default == 0.05
    assert losses_mod.lambda_at(500) == 5.0 and losses_mod.lambda_at(1000) == 10.0


def test_lambda_at_best_is_the_lambda_of_the_update_that_produced_it(monkeypatch):
    """Restored inside the warm-up (training turns NaN at step 8): the checkpoint of step 5 was made by
    the update at t=4, so its lambda is 10 * 4/20 = 2.0 in history, lambda_at_best and the message."""
    xi, xt = _planted(200)
    _nan_from_step(monkeypatch, 8)
    cfg = TrainConfig(objective="clip+structure", warmup_steps=20, **SMALL)
    res = train_heads(xi, xt, np.arange(150), np.arange(150, 200), cfg)
    assert res.stopped_reason == "non_finite" and not res.restored_before_warmup  # every step is a candidate
    assert res.best_step == 5, res.history  # planted pairs: step 5 beats the initial heads
    assert res.history[5]["lambda"] == 2.0 == res.lambda_at_best
    assert res.message.startswith("non-finite training loss at step 8")
    assert res.message.endswith(f"restored step 5 by validation rsum {res.best_value:.4g} (lambda 2)")


def test_lambda_at_best_zero_when_initial_heads_restored():
    xi, xt = _random()
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96),
                      TrainConfig(objective="clip+structure", warmup_steps=20, **{**SMALL, "lr": 1e30}))
    assert res.stopped_reason == "non_finite" and res.best_step == 0 and res.lambda_at_best == 0.0
    assert not res.restored_before_warmup and res.message.endswith("(lambda 0)") and "restored step 0 " in res.message


def test_cosine_schedule_in_history():
    xi, xt = _random()
    cfg = TrainConfig(objective="clip", **{**SMALL, "lr": 3e-3})
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    assert res.steps_taken == 40
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=40)
    for s in range(1, 41):  # history row s holds the lr of the update that produced step s
        want = 3e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 40))
        assert res.history[s]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), s
        assert res.history[s]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), s
        ref_opt.step()
        ref.step()


def test_gradient_clip_is_per_head(monkeypatch):
    """The image head's gradient is ~1e3, the text head's ~1e-2: after clipping, the image head's has
    norm 1 and the text head's is untouched (a global clip would scale it by ~1e-3)."""
    real = losses_mod.clip_loss

    def lopsided(zi, zt, tau=0.05):  # the trainer's batches are (runs, rows, dims) stacks
        return 1e-3 * real(zi, zt, tau) + 1e3 * zi[..., 0].float().sum(-1)

    monkeypatch.setattr(losses_mod, "clip_loss", lopsided)
    seen: list[torch.Tensor] = []  # the run's gradients: image head's parameters, then the text head's

    real_step = RunsAdamW.step

    def recording(self):  # the gradients the optimiser steps with: after the clip
        if not seen:
            seen.extend(p.grad[0].detach().clone() for p in self.params)  # the run's slice of each stacked tensor
        return real_step(self)

    monkeypatch.setattr(RunsAdamW, "step", recording)
    xi, xt = _random(n=48, d=12)
    cfg = TrainConfig(objective="clip", dim=8, batch_size=64, max_steps=1, eval_every=1, device="cpu")
    train_heads(xi, xt, np.arange(32), np.arange(32, 48), cfg)  # one full-batch step

    torch.manual_seed(cfg.seed)  # the same initial heads and the same (full) batch, by hand
    ref = make_heads(cfg, 12, 12)
    lopsided(ref.image(torch.from_numpy(xi[:32])), ref.text(torch.from_numpy(xt[:32])), cfg.tau).backward()
    raw = {m: [p.grad for p in getattr(ref, m).parameters()] for m in ("image", "text")}
    n_img = len(raw["image"])
    got = {"image": seen[:n_img], "text": seen[n_img:]}
    norm = {m: float(torch.sqrt(sum((g.double() ** 2).sum() for g in raw[m]))) for m in raw}
    assert norm["image"] > 100 and norm["text"] < 0.5, norm
    for g, r in zip(got["text"], raw["text"]):  # not scaled down by the other head's norm
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)
    for g, r in zip(got["image"], raw["image"]):  # per-group clip to norm 1.0
        assert torch.allclose(g, r / (norm["image"] + 1e-6), rtol=1e-4, atol=1e-7)
    clipped = float(torch.sqrt(sum((g.double() ** 2).sum() for g in got["image"])))
    assert clipped == pytest.approx(1.0, rel=1e-4)


def _dense_rs_knn(x_all: torch.Tensor, z_all: torch.Tensor, bidx: list[int], graph: np.ndarray, tau: float,
                  levels: int) -> float:
    """docs/method.md § 3.3 written out: P over the extended support (batch U N(i), each row once), float64."""
    x_all, z_all = x_all.double(), z_all.double()
    support = sorted(set(bidx) | {int(j) for i in bidx for j in graph[i]})
    col = {j: c for c, j in enumerate(support)}
    allowed = torch.zeros(len(bidx), len(support), dtype=torch.bool)
    for r, i in enumerate(bidx):
        for j in list(bidx) + [int(j) for j in graph[i]]:
            allowed[r, col[j]] = True

    def affinities(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        an = torch.nn.functional.normalize(a, dim=1)
        mean = an[bidx].mean(0)
        c = an - mean
        ext = (c[bidx] @ c[support].T / tau).masked_fill(~allowed, -math.inf).softmax(1)
        batch = (c[bidx] @ c[bidx].T / tau).softmax(1)
        return ext, batch

    def js_ref(px: torch.Tensor, pz: torch.Tensor) -> float:
        m = 0.5 * (px + pz)
        lg = lambda t: torch.log(t + 1e-12)  # noqa: E731
        return float(0.5 * ((m * (lg(m) - lg(pz))).sum(1).mean() + (m * (lg(m) - lg(px))).sum(1).mean()))

    ex, bx = affinities(x_all)
    ez, bz = affinities(z_all)
    ds = [js_ref(ex, ez)]
    if levels >= 2:
        ds.append(js_ref(bx @ bx, bz @ bz))
    return sum(ds) / len(ds)


@pytest.mark.parametrize("levels", [1, 2])
def test_knn_trainer_term_equals_dense_method_3_3(monkeypatch, levels):
    """The first step's regulariser (initial heads, first batch) against docs/method.md § 3.3 built densely."""
    from stratalign.train import heads_loop

    xi, xt = _random(n=60, d=8, seed=4)
    batches: list[torch.Tensor] = []
    real_batches = heads_loop.epoch_batches

    def spy(n, batch, gen):
        out = real_batches(n, batch, gen)
        batches.extend(out)
        return out

    monkeypatch.setattr(heads_loop, "epoch_batches", spy)
    cfg = TrainConfig(objective="clip+structure-knn", knn_k=4, dim=8, batch_size=16, max_steps=1, eval_every=1,
                      warmup_steps=0, tau=0.1, levels=levels, device="cpu")
    res = train_heads(xi, xt, np.arange(40), np.arange(40, 60), cfg)
    bidx = batches[0].tolist()
    torch.manual_seed(cfg.seed)
    heads = make_heads(cfg, 8, 8)
    want = 0.0
    for x, head in ((xi[:40], heads.image), (xt[:40], heads.text)):
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = xn @ xn.T
        np.fill_diagonal(s, -np.inf)
        graph = np.argsort(-s, axis=1, kind="stable")[:, :4]
        inside = sum(int(j) in bidx for i in bidx for j in graph[i])
        assert 0 < inside < 4 * len(bidx), "the batch must hold some neighbours and miss others"
        xt_ = torch.from_numpy(x)
        with torch.no_grad():
            want += 0.5 * _dense_rs_knn(xt_, head(xt_), bidx, graph, cfg.tau, levels)
    assert res.history[1]["reg"] == pytest.approx(want, rel=1e-4)
    batch_form = 0.5 * sum(float(losses_mod.structure_regularizer(torch.from_numpy(x[bidx]), h(torch.from_numpy(
        x[bidx])).detach(), tau=0.1, levels=levels)) for x, h in ((xi, heads.image), (xt, heads.text)))
    assert abs(batch_form - want) > 1e-3 * want  # the graph really changes the value


def test_precomputed_graphs_are_used_and_checked(monkeypatch):
    from stratalign.train import frozen_graphs

    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure-knn", knn_k=5, warmup_steps=4, **{**SMALL, "max_steps": 8})
    graphs = frozen_graphs.knn_graphs(xi, xt, np.arange(64), 5)
    assert graphs[0].shape == (64, 5) and np.array_equal(graphs[1], knn_graph(xt[:64], 5))
    built = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)

    def boom(*a, **k):
        raise AssertionError("knn_graph must not run when graphs are given")

    monkeypatch.setattr(frozen_graphs, "knn_graph", boom)
    given = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg, graphs=graphs)
    sa, sb = _state(built.model), _state(given.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(StratalignError, match=r"expected \(64, 5\)"):
        train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg, graphs=(graphs[0][:, :3], graphs[1]))
    with pytest.raises(StratalignError, match="another subset"):
        train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg, graphs=(graphs[0] + 1, graphs[1]))
    with pytest.raises(StratalignError, match="only used by the clip\\+structure-knn"):
        train_heads(xi, xt, np.arange(64), np.arange(64, 96), TrainConfig(**SMALL), graphs=graphs)


def _curve_rule(res, key, higher, first_candidate):
    """The checkpoint docs/method.md § 3.8 restores, computed from the recorded curve: the best value of the selection
    metric among the evaluated steps >= the first candidate, the earliest on ties."""
    rows = [r for r in res.val_curve if r["step"] >= first_candidate and math.isfinite(r[key])]
    best = max(r[key] for r in rows) if higher else min(r[key] for r in rows)
    return min(r["step"] for r in rows if r[key] == best)


@pytest.mark.parametrize("objective", ["clip", "clip+structure", "clip+ib", "clip+vib"])
def test_selection_by_validation_rsum_is_the_default(objective):
    """Planted pairs: the curve of every yardstick is recorded at the same steps, and the restored step is the
    best validation rsum (R@1+R@5+R@10 both ways, recomputed here from the restored heads) after the warm-up."""
    xi, xt = _planted(260)
    cfg = TrainConfig(objective=objective, warmup_steps=10, **{**SMALL, "max_steps": 60})
    assert cfg.select == "rsum"
    res = train_heads(xi, xt, np.arange(200), np.arange(200, 260), cfg)
    steps = [r["step"] for r in res.val_curve]
    assert steps == list(range(0, 61, 5))  # the same evaluation steps whatever the objective
    assert all({"rsum", "clip_loss", "lambda"} <= set(r) for r in res.val_curve)
    first = cfg.resolved_warmup()
    assert res.best_step == _curve_rule(res, "rsum", True, first)
    assert res.best_value == max(r["rsum"] for r in res.val_curve if r["step"] >= first)
    # the restored heads really score that rsum on the validation pairs (each pair its own image)
    from stratalign.core.scoring import retrieval_recall

    zi, zt = embed(res.model, xi[200:], "image").numpy(), embed(res.model, xt[200:], "text").numpy()
    rec = retrieval_recall(zi, zt, np.arange(60))
    assert sum(rec.values()) == pytest.approx(res.best_value, abs=1e-6)
    summary = res.summary()
    assert summary["selection"]["metric"] == "rsum" and summary["selection"]["step"] == res.best_step
    assert summary["val_curve"] == res.val_curve


def test_selection_metric_choices_pick_different_rules():
    """clip_loss picks the lowest validation CLIP loss, zeroshot the best validation top-1; an unknown metric,
    zeroshot without labels, and select on an objective that has nothing to select are one-line errors."""
    from stratalign.train.validation import ValidationTargets

    xi, xt = _planted(260)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    prompts = rng.standard_normal((3, 2, xt.shape[1])).astype(np.float32)
    targets = ValidationTargets(np.arange(60), labels, prompts)
    by = {}
    for select in ("rsum", "zeroshot", "clip_loss"):
        cfg = TrainConfig(objective="clip", select=select, **{**SMALL, "max_steps": 60})
        by[select] = train_heads(xi, xt, np.arange(200), np.arange(200, 260), cfg, targets=targets)
    assert all("zs_top1" in r for r in by["zeroshot"].val_curve)
    assert by["clip_loss"].best_step == _curve_rule(by["clip_loss"], "clip_loss", False, 0)
    assert by["zeroshot"].best_step == _curve_rule(by["zeroshot"], "zs_top1", True, 0)
    assert by["rsum"].val_curve == by["zeroshot"].val_curve  # selection does not change what is trained
    with pytest.raises(StratalignError, match="select must be one of"):
        TrainConfig(select="accuracy")
    with pytest.raises(StratalignError, match="select zeroshot needs validation labels"):
        train_heads(xi, xt, np.arange(200), np.arange(200, 260), TrainConfig(select="zeroshot", **SMALL))
    with pytest.raises(StratalignError, match="does not select on a validation metric"):
        TrainConfig(objective="comm", select="rsum")
    with pytest.raises(StratalignError, match="objective csa does not select"):
        TrainConfig(head="csa", select="rsum")  # csa records objective 'clip' with its own head


def test_rsum_gallery_dedups_images_of_several_captions():
    """Validation pairs sharing an image id form one gallery image: i2t counts an image once, with any of its
    captions a hit (docs/method.md § 4), so the rsum differs from the one that treats every pair as its own image."""
    from stratalign.train.validation import ValidationTargets, Validator

    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 6)).astype(np.float32)
    vi = torch.from_numpy(np.repeat(img, 2, axis=0))  # 4 images, 2 captions each
    vt = torch.from_numpy(np.repeat(img, 2, axis=0) + 0.01 * rng.standard_normal((8, 6)).astype(np.float32))
    ident = lambda modality, x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    grouped = Validator(vi, vt, ValidationTargets(np.repeat(np.arange(4), 2)), 0.1, 32).score(ident)
    assert grouped["rsum"] == pytest.approx(600.0)  # every image finds a caption, every caption its image
    per_pair = Validator(vi, vt, ValidationTargets.pairs_only(8), 0.1, 32).score(ident)
    assert per_pair["rsum"] < grouped["rsum"]  # duplicated images split the R@1 hits between two "images"
