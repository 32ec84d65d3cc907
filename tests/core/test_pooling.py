"""Pooling functions against values computed by hand (docs/method.md § 1)."""

from __future__ import annotations

import pytest
import torch

from stratalign.core.pooling import cls_pool, eos_pool, masked_mean_pool, patch_mean_pool, pool_layers, spatial_avg_pool
from stratalign.errors import StratalignError


def tokens() -> torch.Tensor:
    # batch 2, 3 tokens, dim 2
    return torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                         [[-1.0, 0.0], [10.0, 20.0], [100.0, 200.0]]])


def test_cls_is_token_zero() -> None:
    out = cls_pool(tokens())
    assert out.tolist() == [[1.0, 2.0], [-1.0, 0.0]]
    assert out.dtype == torch.float32


def test_patch_mean_excludes_token_zero() -> None:
    out = patch_mean_pool(tokens())
    assert out.tolist() == [[4.0, 5.0], [55.0, 110.0]]  # (3+5)/2, (4+6)/2 ; (10+100)/2, (20+200)/2


def test_patch_mean_excludes_register_tokens() -> None:
    out = patch_mean_pool(tokens(), n_prefix=2)
    assert out.tolist() == [[5.0, 6.0], [100.0, 200.0]]


def test_masked_mean_ignores_padding() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = masked_mean_pool(tokens(), mask)
    assert out.tolist() == [[2.0, 3.0], [-1.0, 0.0]]  # (1+3)/2, (2+4)/2 ; only token 0


def test_masked_mean_all_ones_is_plain_mean() -> None:
    h = torch.randn(3, 5, 4)
    assert torch.allclose(masked_mean_pool(h, torch.ones(3, 5, dtype=torch.long)), h.mean(1), atol=1e-6)


def test_masked_mean_empty_row_gives_zeros() -> None:
    out = masked_mean_pool(tokens(), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    assert out[1].tolist() == [0.0, 0.0]
    assert torch.isfinite(out).all()


def test_eos_is_last_attended_token() -> None:
    out = eos_pool(tokens(), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert out.tolist() == [[3.0, 4.0], [100.0, 200.0]]


def test_spatial_average() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = spatial_avg_pool(x)
    assert out.shape == (2, 3)
    assert out[0].tolist() == [1.5, 5.5, 9.5]  # mean of 0..3, 4..7, 8..11


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_pool_in_float32(dtype: torch.dtype) -> None:
    # 4096 copies of 1000: a float16 sum would overflow (max 65504); the float32 sum must not
    h = torch.full((1, 4097, 2), 1000.0, dtype=dtype)
    mask = torch.ones(1, 4097, dtype=torch.long)
    for out in (patch_mean_pool(h), masked_mean_pool(h, mask), cls_pool(h), eos_pool(h, mask)):
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert out[0, 0].item() == pytest.approx(1000.0)
    fm = torch.full((1, 2, 100, 100), 1000.0, dtype=dtype)
    out = spatial_avg_pool(fm)
    assert out.dtype == torch.float32 and out[0, 0].item() == pytest.approx(1000.0)


def test_pool_layers_every_layer_and_pooling() -> None:
    hs = [tokens(), tokens() * 2]
    out = pool_layers(hs, ["cls", "mean"], kind="vision")
    assert set(out) == {"cls", "mean"}
    assert [t.tolist() for t in out["cls"]] == [[[1.0, 2.0], [-1.0, 0.0]], [[2.0, 4.0], [-2.0, 0.0]]]
    assert out["mean"][1].tolist() == [[8.0, 10.0], [110.0, 220.0]]
    text = pool_layers(hs, ["mean"], kind="text", attention_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert text["mean"][0].tolist() == [[2.0, 3.0], [-1.0, 0.0]]


def test_pool_layers_rejects_wrong_pooling() -> None:
    with pytest.raises(StratalignError, match="not defined for CNN"):
        pool_layers([torch.zeros(1, 2, 2, 2)], ["cls"], kind="cnn")
    with pytest.raises(StratalignError, match="needs the attention mask"):
        pool_layers([tokens()], ["mean"], kind="text")
    with pytest.raises(StratalignError, match="batch, tokens, dim"):
        cls_pool(torch.zeros(2, 3))
