"""Training inputs: checks of the paired feature arrays and row indices, and their upload to the device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stratalign.errors import StratalignError


def _index(a: Any, name: str, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise StratalignError(f"{name} must be a 1-D integer array")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise StratalignError(f"{name} holds rows outside [0, {n}): min {a.min()}, max {a.max()}")
    if len(np.unique(a)) != len(a):
        raise StratalignError(f"{name} repeats rows")
    return a


def check_inputs(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray,
                 val_idx: np.ndarray | None, *, fixed_stop: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(train rows, validation rows) as int64 after checking shapes, dtypes, ranges and overlap. fixed_stop: the run
    stops at a given step (`stop_step`), so its validation rows choose nothing and may be rows it trains on (the
    k-fold refit monitors some of its own pairs, docs/method.md § 3.8)."""
    for name, x in (("x_img", x_img), ("x_txt", x_txt)):
        if not hasattr(x, "ndim") or x.ndim != 2:
            raise StratalignError(f"{name} must be a 2-D array (pairs x features), got {getattr(x, 'shape', x)!r}")
        if not np.issubdtype(np.asarray(x[:0]).dtype, np.floating):
            raise StratalignError(f"{name} must hold floats, not {x.dtype}")
    if len(x_img) != len(x_txt):
        raise StratalignError(f"x_img has {len(x_img)} rows but x_txt has {len(x_txt)}: rows must be pairs")
    n = len(x_img)
    tr = _index(train_idx, "train_idx", n)
    if len(tr) < 2:
        raise StratalignError(f"train_idx needs at least 2 pairs, got {len(tr)}")
    if val_idx is None:
        return tr, None
    va = _index(val_idx, "val_idx", n)
    if len(va) < 2:
        raise StratalignError(f"val_idx needs at least 2 pairs for early stopping, got {len(va)}")
    both = np.intersect1d(tr, va)
    if both.size and not fixed_stop:
        raise StratalignError(f"train_idx and val_idx overlap in {both.size} rows, e.g. {both[:5].tolist()}")
    return tr, va


def to_device(x: np.ndarray, rows: np.ndarray, dev: torch.device, name: str) -> torch.Tensor:
    """The selected rows as a float32 device tensor; NaN or inf -> error naming the array. Every row in order of a
    contiguous float32 array on the CPU is the array itself (no copy: at COCO scale a copy is gigabytes)."""
    whole = len(rows) == len(x) and bool(np.array_equal(rows, np.arange(len(x))))
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x if whole else x[rows]), dtype=np.float32)).to(dev)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise StratalignError(f"{name} has NaN or inf in {bad} of the selected rows")
    return t
