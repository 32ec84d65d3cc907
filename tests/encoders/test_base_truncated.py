"""Encoder.forward_layer: one layer's pooled features from a forward pass stopped after that layer, equal to
the same layer of the full `forward_pooled`, with the later blocks never run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TEXTS, images, save_tiny_bert, save_tiny_vit

from stratalign.encoders import load_encoder
from stratalign.errors import StratalignError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path / "cache"))


def _block_calls(blocks: list[torch.nn.Module]) -> list[int]:
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _check_every_layer(enc, items: list, blocks: list[torch.nn.Module] | None) -> None:
    batch = enc.preprocess(items)
    full = {p: enc.forward_pooled(batch, [p])[p] for p in enc.poolings}
    calls = _block_calls(blocks) if blocks else None
    for layer in range(enc.n_layers):
        for p in enc.poolings:
            if calls:
                calls[:] = [0] * len(calls)
            got = enc.forward_layer(batch, layer, p)
            assert got.dtype == torch.float32 and got.shape == full[p][layer].shape
            torch.testing.assert_close(got, full[p][layer], rtol=0, atol=1e-6)
            if calls is not None and layer < enc.n_layers - 1:
                ran = sum(1 for c in calls if c)
                assert ran < len(calls), f"layer {layer}: all {len(calls)} blocks ran"


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_reg", "clip"])
def test_hf_vision_truncated_equals_full(tmp_path: Path, kind: str) -> None:
    enc = load_encoder("hf:" + str(save_tiny_vit(tmp_path / kind, kind)))
    assert enc.truncates
    _check_every_layer(enc, images(3), enc.blocks)


def test_hf_text_truncated_equals_full_and_runs_layer_blocks(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_bert(tmp_path / "bert")))
    assert enc.truncates and len(enc.blocks) == enc.n_layers - 1
    _check_every_layer(enc, TEXTS, enc.blocks)
    calls = _block_calls(enc.blocks)
    enc.forward_layer(enc.preprocess(TEXTS), 1, "mean")
    assert calls == [1, 0]  # layer 1 = block 1's output: block 2 never runs


def test_minilm_truncated_equals_full() -> None:
    enc = load_encoder("minilm-l6")
    _check_every_layer(enc, TEXTS, enc.blocks)


def test_efficientnet_truncated_equals_full() -> None:
    enc = load_encoder("efficientnet-lite0")
    assert enc.truncates
    _check_every_layer(enc, images(2), list(enc.model._blocks))


def test_layer_out_of_range_is_one_line(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_bert(tmp_path / "bert")))
    with pytest.raises(StratalignError, match="layers 0..2, not 3"):
        enc.forward_layer(enc.preprocess(TEXTS), 3, "mean")
