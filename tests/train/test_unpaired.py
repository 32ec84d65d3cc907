"""Unpaired rows in the R_S batches (docs/method.md § 3.11): they reach R_S of their own modality and nothing else.

- with 0 unpaired rows the objective trains exactly as clip+structure, and with lambda 0 exactly as CLIP (the
  zero-weight invariant), whatever the pools hold;
- the CLIP loss never sees an unpaired row (its inputs hold the b paired rows; R_S's hold b + u);
- R_S with unpaired rows equals the formula computed by hand on a tiny example;
- the knob's checks and its recorded form (a run without unpaired rows records neither knob: ids unchanged).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import losses
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig, train_heads
from stratalign.train.heads_init import init_run_heads

SCHEDULE = dict(dim=8, batch_size=32, max_steps=30, eval_every=5, patience=30, lr=1e-2, tau=0.1, warmup_steps=10,
                device="cpu")


def _data(n: int = 100, d: int = 10, extra: int = 40, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Paired rows with a shared signal, and `extra` rows of each modality with no partner."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(n, 4))
    xi = (z @ g.normal(size=(4, d)) + 0.5 * g.normal(size=(n, d))).astype(np.float32)
    xt = (z @ g.normal(size=(4, d + 2)) + 0.5 * g.normal(size=(n, d + 2))).astype(np.float32)
    ui = g.normal(size=(extra, d)).astype(np.float32)
    ut = g.normal(size=(extra + 3, d + 2)).astype(np.float32)
    return xi, xt, ui, ut


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_zero_unpaired_rows_train_as_clip_structure_and_zero_weight_as_clip(head: str) -> None:
    xi, xt, ui, ut = _data()
    tr, va = np.arange(80), np.arange(80, 100)
    opts = dict(SCHEDULE, head=head, head_options={"dropout": 0.2} if head == "mlp" else {})
    structure = train_heads(xi, xt, tr, va, TrainConfig(objective="clip+structure", lam=3.0, **opts))
    none = train_heads(xi, xt, tr, va, TrainConfig(objective="clip+structure+unpaired", lam=3.0, unpaired=0, **opts),
                       unpaired=(ui, ut))
    assert _same_weights(none, structure) and none.best_step == structure.best_step
    clip = train_heads(xi, xt, tr, va, TrainConfig(objective="clip", **opts))
    zero = train_heads(xi, xt, tr, va, TrainConfig(objective="clip+structure+unpaired", lam=0.0, unpaired=16, **opts),
                       unpaired=(ui, ut))
    assert _same_weights(zero, clip) and zero.val_curve == clip.val_curve
    some = train_heads(xi, xt, tr, va, TrainConfig(objective="clip+structure+unpaired", lam=3.0, unpaired=16, **opts),
                       unpaired=(ui, ut))
    assert not _same_weights(some, structure)  # not vacuous: the unpaired rows move the run


def test_unpaired_rows_never_enter_the_clip_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    xi, xt, ui, ut = _data()
    seen: dict[str, list[tuple[int, ...]]] = {"clip": [], "rs": []}
    clip_loss, rs = losses.clip_loss, losses.structure_regularizer

    def spy_clip(a, b, *args, **kw):
        seen["clip"].append(tuple(a.shape[:-1]) + tuple(b.shape[:-1]))
        return clip_loss(a, b, *args, **kw)

    def spy_rs(x, z, *args, **kw):
        seen["rs"].append(tuple(x.shape[:-1]))
        return rs(x, z, *args, **kw)

    monkeypatch.setattr(losses, "clip_loss", spy_clip)
    monkeypatch.setattr(losses, "structure_regularizer", spy_rs)
    cfg = TrainConfig(objective="clip+structure+unpaired", lam=3.0, unpaired=12, **dict(SCHEDULE, max_steps=12))
    res = train_heads(xi, xt, np.arange(80), np.arange(80, 100), cfg, unpaired=(ui, ut))
    assert res.steps_taken == 12
    # training steps: the 32 pairs of a batch; validation: its 20 pairs; never 32 + 12 rows
    assert (1, 32, 1, 32) in seen["clip"] and set(seen["clip"]) <= {(1, 32, 1, 32), (1, 20, 1, 20), (20, 20)}
    assert seen["rs"] and set(seen["rs"]) == {(1, 32 + 12)}  # R_S: the 32 pairs' rows and 12 unpaired ones
    # the CLIP loss of the first step is the one of the same run without unpaired rows (same init, same batch)
    plain = train_heads(xi, xt, np.arange(80), np.arange(80, 100),
                        TrainConfig(objective="clip+structure", lam=3.0, **dict(SCHEDULE, max_steps=12)))
    assert res.history[1]["clip"] == plain.history[1]["clip"]


def _rs_by_hand(x: np.ndarray, z: np.ndarray, tau: float) -> float:
    """docs/method.md § 3.2 on one modality's rows, float64: normalise, centre, softmax, 1/2 [KL(M||P_Z) + KL(M||P_X)]."""
    def p(a: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        a = a - a.mean(0, keepdims=True)
        s = a @ a.T / tau
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    px, pz = p(x), p(z)
    m = 0.5 * (px + pz)
    kl = lambda a, b: (a * (np.log(a + 1e-12) - np.log(b + 1e-12))).sum(1).mean()  # noqa: E731
    return 0.5 * (kl(m, pz) + kl(m, px))


@pytest.mark.parametrize("captions", [4, 0])
def test_structure_with_unpaired_rows_equals_the_formula_by_hand(captions: int) -> None:
    """One full batch of 6 pairs plus a pool of 4 rows per modality drawn whole (u = 4): R_S of each modality is the
    formula on the 10 rows (a row order does not change it), the step's reg their mean. Without unpaired captions
    (an image-only pool) the text side's R_S reads the 6 pairs alone."""
    xi, xt, ui, ut = _data(n=9, d=5, extra=4)
    ut = ut[:captions]
    tr, va = np.arange(6), np.arange(6, 9)
    cfg = TrainConfig(objective="clip+structure+unpaired", lam=2.0, unpaired=4,
                      **dict(SCHEDULE, max_steps=1, eval_every=1, warmup_steps=0))
    res = train_heads(xi, xt, tr, va, cfg, unpaired=(ui, ut))
    model, _ = init_run_heads(cfg, xi.shape[1], xt.shape[1], torch.device("cpu"))
    with torch.no_grad():
        zi = model.image(torch.from_numpy(np.concatenate([xi[tr], ui]))).double().numpy()
        zt = model.text(torch.from_numpy(np.concatenate([xt[tr], ut]))).double().numpy()
    xi_all, xt_all = np.concatenate([xi[tr], ui]).astype(np.float64), np.concatenate([xt[tr], ut]).astype(np.float64)
    expected = 0.5 * (_rs_by_hand(xi_all, zi, cfg.tau) + _rs_by_hand(xt_all, zt, cfg.tau))
    assert res.history[1]["reg"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # and it is not the paired-only value
    paired = 0.5 * (_rs_by_hand(xi[tr].astype(np.float64), zi[:6], cfg.tau)
                    + _rs_by_hand(xt[tr].astype(np.float64), zt[:6], cfg.tau))
    assert abs(paired - expected) > 1e-4


def test_unpaired_knob_checks_and_recorded_form() -> None:
    plain = TrainConfig(objective="clip+structure+unpaired", unpaired=0, unpaired_from="pool")
    assert plain.unpaired_from == "dataset"
    assert "unpaired" not in plain.to_dict() and "unpaired_from" not in plain.to_dict()
    assert "unpaired" not in TrainConfig(objective="clip+structure").to_dict()
    used = TrainConfig(objective="clip+structure+unpaired", unpaired_from="pool")
    assert used.unpaired == 256 and used.to_dict()["unpaired_from"] == "pool"
    assert TrainConfig.from_dict(used.to_dict()) == used
    with pytest.raises(StratalignError, match="objective clip has no regulariser for unpaired rows"):
        TrainConfig(objective="clip", unpaired=8)
    with pytest.raises(StratalignError, match="unpaired_from must be one of"):
        TrainConfig(objective="clip+structure+unpaired", unpaired_from="elsewhere")
    xi, xt, ui, ut = _data()
    with pytest.raises(StratalignError, match="names no unpaired rows"):
        train_heads(xi, xt, np.arange(80), np.arange(80, 100), TrainConfig(objective="clip+structure+unpaired",
                                                                           **SCHEDULE))
    with pytest.raises(StratalignError, match="no unpaired image or caption rows"):
        train_heads(xi, xt, np.arange(80), np.arange(80, 100), TrainConfig(objective="clip+structure+unpaired",
                                                                           **SCHEDULE), unpaired=(ui[:0], ut[:0]))
