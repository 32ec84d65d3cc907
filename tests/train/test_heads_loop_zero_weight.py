"""The zero-weight invariant (docs/method.md § 3.8): every regularised objective with its weight at 0 trains exactly as the
CLIP baseline - the same steps evaluated, the same restored step, the same weights and validation numbers.

A rule that touches one objective and not its baseline (a selection window, a stopping rule, an extra
evaluation step, a schedule) breaks this; it is what would make a comparison against CLIP confounded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core.objectives import REGISTRY, Training
from stratalign.device import bf16_supported
from stratalign.train import TrainConfig, train_heads, train_many
from stratalign.train.fit import RunSpec

REGULARISED = [o for o in REGISTRY if o.training is Training.GRADIENT and o.regulariser is not None]
SCHEDULE = dict(dim=16, batch_size=32, max_steps=60, eval_every=5, patience=15, lr=1e-2, tau=0.1, warmup_steps=20,
                device="cpu")


def _planted(n: int = 160, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with a shared signal (so validation moves and a restored step means something)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    xi = z @ torch.randn(6, d, generator=g) + 0.5 * torch.randn(n, d, generator=g)
    xt = z @ torch.randn(6, d, generator=g) + 0.5 * torch.randn(n, d, generator=g)
    return xi, xt


def _unpaired(objective: str) -> dict:
    """Rows without partners for an objective that adds them to R_S (docs/method.md § 3.11), else nothing."""
    if objective != "clip+structure+unpaired":
        return {}
    g = torch.Generator().manual_seed(5)
    return {"unpaired": (torch.randn(50, 12, generator=g).numpy(), torch.randn(40, 12, generator=g).numpy())}


def _same(a, b) -> None:
    assert a.best_step == b.best_step
    assert [r["step"] for r in a.val_curve] == [r["step"] for r in b.val_curve]
    for ra, rb in zip(a.val_curve, b.val_curve):
        assert {k: v for k, v in ra.items() if k != "lambda"} == {k: v for k, v in rb.items() if k != "lambda"}
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.stopped_reason == b.stopped_reason and a.steps_taken == b.steps_taken


def test_every_regularised_gradient_objective_is_covered() -> None:
    names = {o.name for o in REGULARISED}
    assert {"clip+structure", "clip+structure-knn", "clip+ib", "clip+vib"} <= names


BF16 = pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=BF16)])
@pytest.mark.parametrize("objective", [o.name for o in REGULARISED])
def test_weight_zero_trains_exactly_as_clip(objective: str, precision: str) -> None:
    # bf16: the lean step (train.heads_loop) must keep the invariant too, CLIP and the regularised run alike
    obj = next(o for o in REGULARISED if o.name == objective)
    xi, xt = _planted()
    tr, va = np.arange(120), np.arange(120, 160)
    schedule = {**SCHEDULE, "precision": precision}
    clip = train_heads(xi, xt, tr, va, TrainConfig(objective="clip", **schedule))
    zero = train_heads(xi, xt, tr, va, TrainConfig(objective=objective, **{obj.weight_knob: 0.0}, knn_k=4,
                                                   **schedule), **_unpaired(objective))
    _same(zero, clip)
    # and the invariant is not vacuous: a non-zero weight moves the run
    some = train_heads(xi, xt, tr, va, TrainConfig(objective=objective, **{obj.weight_knob: 3.0}, knn_k=4, **schedule),
                       **_unpaired(objective))
    assert not torch.equal(some.model.state_dict()["image.net.weight"] if "image.net.weight" in
                           some.model.state_dict() else next(iter(some.model.state_dict().values())),
                           clip.model.state_dict()["image.net.weight"] if "image.net.weight" in
                           clip.model.state_dict() else next(iter(clip.model.state_dict().values())))


def test_weight_zero_equals_clip_when_both_train_in_one_batched_group() -> None:
    """Trained together (as a sweep trains them), the zero-weight runs still equal CLIP's run."""
    xi, xt = _planted()
    tr, va = np.arange(120), np.arange(120, 160)
    cfgs = [TrainConfig(objective="clip", **SCHEDULE)] + [
        TrainConfig(objective=o.name, **{o.weight_knob: 0.0}, knn_k=4, **SCHEDULE) for o in REGULARISED]
    tables = _unpaired("clip+structure+unpaired")["unpaired"]
    pools = (np.arange(50), np.arange(40))
    results = train_many(xi.numpy(), xt.numpy(), [RunSpec(c, tr, va, unpaired=pools) for c in cfgs], unpaired=tables)
    for res in results[1:]:
        _same(res, results[0])
