"""The labelled toy store several stage tests share: 90 grey squares of 5 brightness levels, captioned "a <level>
square number i", labelled by level, encoded by the tiny deterministic encoders of fake_encoders.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from toy_store import store_of_table

from stratalign.store.feature_store import FeatureStore

LEVELS = ["dark", "dim", "mid", "bright", "white"]
FAST = (("max_steps", 30), ("patience", 30), ("eval_every", 5), ("warmup_steps", 10), ("dim", 16))


def levels_store(root: Path, images: int = 90) -> FeatureStore:
    """A store under `root` holding dataset "toy" (a table of `images` pairs, 70/10/20 split) with tiny-image and
    tiny-text features."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = ["image,caption,label"]
    for i in range(images):
        level = i % len(LEVELS)
        px = np.clip(rng.normal(40 + 50 * level, 12, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a {LEVELS[level]} square number {i},{LEVELS[level]}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return store_of_table(root, root / "pairs.csv")
