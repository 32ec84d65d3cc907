"""TrainConfig.precision (METHOD 3.6): fp32 by default and then absent from the recorded settings (run ids unchanged);
bf16 and auto recorded as what ran; bf16 where the hardware lacks it refused in one line before anything trains;
a bf16 run trains under CPU autocast where the CPU has it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign import device as device_mod
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig, train_heads

BASE = dict(dim=16, batch_size=32, max_steps=20, eval_every=5, lr=1e-2, tau=0.1, warmup_steps=5, device="cpu")


def test_fp32_is_left_out_of_the_recorded_settings() -> None:
    assert TrainConfig().precision == "fp32"
    assert "precision" not in TrainConfig().to_dict()
    assert TrainConfig(precision="bf16").to_dict()["precision"] == "bf16"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).precision == "fp32"


def test_auto_resolves_to_what_the_device_has(monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "bf16_supported", lambda dev: True)
    assert TrainConfig(precision="auto", device="cpu").precision == "bf16"
    monkeypatch.setattr(device_mod, "bf16_supported", lambda dev: False)
    assert TrainConfig(precision="auto", device="cpu").precision == "fp32"


def test_bf16_without_the_hardware_is_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "bf16_supported", lambda dev: False)
    cfg = TrainConfig(precision="bf16", **BASE)  # a recorded config still loads anywhere
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    with pytest.raises(StratalignError, match=r"precision bf16 needs .* use --precision fp32") as err:
        train_heads(x, x, np.arange(40), np.arange(40, 60), cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(StratalignError, match="precision must be one of"):
        TrainConfig(precision="fp16")


@pytest.mark.skipif(not device_mod.bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_a_bf16_run_trains_under_cpu_autocast(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((120, 4))
    xi = (s @ rng.standard_normal((4, 24)) + 0.3 * rng.standard_normal((120, 24))).astype(np.float32)
    xt = (s @ rng.standard_normal((4, 20)) + 0.3 * rng.standard_normal((120, 20))).astype(np.float32)
    seen = []
    real = torch.baddbmm

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "baddbmm", spy)
    fp32 = train_heads(xi, xt, np.arange(100), np.arange(100, 120), TrainConfig(objective="clip+structure", **BASE))
    n32 = len(seen)
    bf16 = train_heads(xi, xt, np.arange(100), np.arange(100, 120),
                       TrainConfig(objective="clip+structure", precision="bf16", **BASE))
    assert set(seen[:n32]) == {torch.float32} and torch.bfloat16 in set(seen[n32:])
    assert all(np.isfinite(h["loss"]) for h in bf16.history[1:])
    assert all(v.dtype == torch.float32 for v in bf16.model.state_dict().values())  # weights stay float32
    w32, w16 = fp32.model.state_dict(), bf16.model.state_dict()
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # another precision, other numbers
    assert bf16.best_value > 0.5 * fp32.best_value  # and it still learns
