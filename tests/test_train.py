"""Trainer: determinism, the early-stopping rules of METHOD 3.6, NaN handling, storage, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stratalign.pipeline.losses as losses_mod
from stratalign.errors import StratalignError
from stratalign.pipeline.heads import AlignedHeads, VariationalHead
from stratalign.pipeline.train import (
    TrainConfig,
    embed,
    knn_graph,
    load_heads,
    make_heads,
    model_from_tensors,
    model_tensors,
    save_heads,
    train_heads,
    train_run,
)


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


def test_checkpoints_before_warmup_are_not_candidates():
    """Random pairs overfit at once, so the val CLIP loss is lowest inside the warm-up; the structure run
    must still restore a step at or after the warm-up, with full lambda recorded."""
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", warmup_steps=20, **SMALL)
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    vals = {h["step"]: h["val_clip"] for h in res.history if "val_clip" in h}
    assert 20 in vals, "the warm-up end must be evaluated"
    assert min(vals, key=vals.get) < 20  # the overall minimum sits inside the warm-up ...
    assert res.best_step >= 20  # ... but is not a candidate
    assert res.best_step == min((s for s in vals if s >= 20), key=lambda s: vals[s])
    assert res.lambda_at_best == 10.0 and not res.restored_before_warmup
    assert res.best_val_clip == vals[res.best_step]
    summary = res.summary()
    assert summary["best_step"] == res.best_step and summary["lambda_at_best"] == 10.0
    # the same data with plain clip (no warm-up) keeps the early minimum
    plain = train_heads(xi, xt, np.arange(64), np.arange(64, 96), TrainConfig(objective="clip", **SMALL))
    assert plain.best_step < 20 and plain.lambda_at_best == 0.0


def test_warmup_fraction_and_patience():
    xi, xt = _random()
    cfg = TrainConfig(objective="clip+structure", warmup_fraction=0.25, **{**SMALL, "patience": 10})
    assert cfg.resolved_warmup() == 10
    res = train_heads(xi, xt, np.arange(64), np.arange(64, 96), cfg)
    assert res.warmup_steps == 10 and res.best_step >= 10
    assert res.stopped_reason == "early_stopping" and res.steps_taken == res.best_step + 10
    # the lambda recorded per step is the warm-up ramp by optimiser steps
    lam = {h["step"]: h["lambda"] for h in res.history if "lambda" in h}
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


def test_nan_loss_stops_and_keeps_best(monkeypatch):
    xi, xt = _random()
    real = losses_mod.clip_loss
    calls = {"n": 0}

    def flaky(zi, zt, tau=0.05):
        out = real(zi, zt, tau)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 13:
                return out * float("nan")
        return out

    monkeypatch.setattr(losses_mod, "clip_loss", flaky)
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
    model, summary = train_run(xi, xt, np.arange(600), np.arange(600, 700),
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
