"""Plots: the PNGs exist, are real images of a sensible size, and bad input is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from stratalign.errors import StratalignError
from stratalign.report.plots import curves, layer_heatmap


def check_png(path: Path, min_w: int = 300, min_h: int = 250) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    return pixels


def test_layer_heatmap(tmp_path: Path) -> None:
    mat = np.random.default_rng(0).uniform(size=(13, 7))
    out = layer_heatmap(mat, str(tmp_path / "sub" / "heat.png"), vision_names=[f"blocks.{i}" for i in range(13)],
                        text_names=[f"layer{i}" for i in range(7)], title="mutual_knn: dinov2 x minilm",
                        chosen=(4, 3), last=(12, 6), metric="mutual_knn")
    pixels = check_png(Path(out))
    assert (pixels[..., 0] > 200).sum() > 50  # the red box of the chosen pair is drawn


def test_layer_heatmap_plain_and_errors(tmp_path: Path) -> None:
    check_png(Path(layer_heatmap(np.arange(6.0).reshape(2, 3), str(tmp_path / "h.png"))), min_w=200, min_h=200)
    big = np.random.default_rng(1).uniform(size=(30, 30))
    check_png(Path(layer_heatmap(big, str(tmp_path / "big.png"), chosen=(-1, 0))))
    with pytest.raises(StratalignError, match=r"chosen=\(5, 0\)"):
        layer_heatmap(np.ones((2, 3)), str(tmp_path / "x.png"), chosen=(5, 0))
    with pytest.raises(StratalignError, match="2 vision / 2 text names"):
        layer_heatmap(np.ones((2, 3)), str(tmp_path / "x.png"), vision_names=["a", "b"], text_names=["a", "b"])
    with pytest.raises(StratalignError, match="2-D"):
        layer_heatmap(np.ones(3), str(tmp_path / "x.png"))


def records() -> list[dict]:
    rng = np.random.default_rng(2)
    out = []
    for obj, gain in (("clip", 0.0), ("clip+structure", 5.0)):
        for n in (250, 1000, 4000):
            for seed in range(3):
                out.append({"objective": obj, "n_pairs": n, "seed": seed,
                            "t2i_R@1": 10 * np.log10(n) + gain + rng.normal(), "i2t_R@1": None if seed == 2 else 5.0})
    return out


def test_curves_records_and_polars(tmp_path: Path) -> None:
    rows = records()
    check_png(Path(curves(rows, str(tmp_path / "c.png"), x="n_pairs", y="t2i_R@1", hue="objective",
                          title="R@1 vs pairs")))
    df = pl.DataFrame(rows)
    out = curves(df, str(tmp_path / "c2.png"), x="n_pairs", y=["t2i_R@1", "i2t_R@1"], hue="objective")
    with Image.open(out) as im:
        assert im.width > 1.5 * im.height  # two panels side by side
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    check_png(Path(curves(cols, str(tmp_path / "c3.png"), x="n_pairs", y="t2i_R@1", hue=None, logx=False)))


def test_curves_errors(tmp_path: Path) -> None:
    with pytest.raises(StratalignError, match="'zs_top1'"):
        curves(records(), str(tmp_path / "x.png"), x="n_pairs", y="zs_top1", hue="objective")
    with pytest.raises(StratalignError, match="no rows"):
        curves([], str(tmp_path / "x.png"), x="n_pairs", y="a")
    with pytest.raises(StratalignError, match="no row has numeric"):
        curves([{"n": 1, "a": None}], str(tmp_path / "x.png"), x="n", y="a")
