"""benchmarks/gpu_check.py: one line and exit 0 without CUDA; its CPU reference pieces on tiny inputs (the CUDA
half cannot run here: each check is run with the CPU on both sides, which must agree exactly)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def test_no_gpu_is_one_line_and_exit_0(gc, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 0
    assert capsys.readouterr().out == "no GPU: nothing to check (torch.cuda.is_available() is False)\n"


def test_extraction_reference_is_the_extraction_forward(gc) -> None:
    model = gc.random_vit(layers=2, hidden=32, image=28)
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 3, 28, 28), dtype=np.float32))
    layers, seconds = gc.pooled_features(model, pixels, "cpu", batch=2)
    assert len(layers) == 3 and all(x.shape == (5, 32) and x.dtype == np.float32 for x in layers) and seconds >= 0
    with torch.no_grad():  # the same numbers as the model's own hidden states' CLS rows
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    for ours, theirs in zip(layers, hidden):
        np.testing.assert_allclose(ours, theirs[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    row = gc.check_extraction(rows=4, layers=2, device="cpu", image=28)
    assert row.ok and row.diff == pytest.approx(0, abs=1e-6)


def test_feature_comparison_catches_a_wrong_device_result(gc) -> None:
    ref = [np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)]
    assert gc.compare_features(ref, ref) == pytest.approx((1.0, 1.0))
    noisy = [ref[0] + np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)]
    mean_cos, worst = gc.compare_features(ref, noisy)
    assert mean_cos < 0.99 and worst < mean_cos


def test_knn_matrix_and_training_references_agree_with_themselves(gc) -> None:
    assert gc.check_knn(200, 16, 5, "cpu").diff == 0
    assert gc.check_layer_matrix(60, 2, 8, "cpu").diff == 0
    row = gc.check_training(400, 16, 12, "cpu", 2)
    assert row.ok and row.diff == 0 and "val clip" in row.cpu
    assert "speed-up" in gc.table([row]).splitlines()[0]
