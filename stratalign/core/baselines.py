"""Closed-form baselines users compare against (METHOD.md section 3.9): ASIF and orthogonal Procrustes.

Both are heads like the trained ones (a `config` that `build_head(**config)` rebuilds, tensors saved as
parameters, L2-normalised outputs), so a fitted baseline goes through the same saving, evaluation, search and
reports as every objective. Nothing here is trained by gradient: the parameters do not require grad.

- Procrustes: each side's rows L2-normalised and centred, projected on its top-d principal directions (d = the
  smaller feature width, capped by dim and n - 1), then the orthogonal map R = U V^T from the SVD of
  P_img^T P_txt (orthogonal Procrustes) rotates the image side onto the text side.
- ASIF (Norelli et al., NeurIPS 2023), training-free: the training pairs are anchors; an image is the vector of
  its cosines to the anchor images, a caption to the anchor captions; each vector keeps its top k entries (k
  default 800, or the number of anchors if fewer), negative cosines set to 0, raised to the power p (default 8),
  normalised. Image and caption vectors share one space (anchor i on both sides), where they are compared.
  The embedding is as wide as there are anchors. Option `center`: the cosines are taken after subtracting the
  anchors' mean from the unit rows (anisotropic features, such as a ViT's CLS token, have high cosines to every
  anchor, which flattens the relative vectors): measured on the demo's Twemoji pairs (DINOv2-S layer 11 x
  MiniLM layer 6, 1,328 anchors, k = 800, p = 8, test split), R@1 i2t / t2i 1.1 / 12.4 without, 17.6 / 19.3
  with (the trained CLIP heads of the same sweep: 12.4 / 11.5). The `asif` objective centres by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stratalign.errors import StratalignError

ASIF_K = 800  # METHOD 3.9
ASIF_POWER = 8.0
# ASIF's default: cosines around the anchors' mean. METHOD 3.9 says plain cosines (center=False keeps that form);
# on the demo's pairs plain cosines of DINOv2-S CLS rows gave i2t R@1 1.1 (see the module docstring)
ASIF_CENTER = True
_ASIF_CHUNK = 1 << 24  # rows x anchors per block of cosines


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise StratalignError(f"{name} must be a positive integer, not {v!r}")


def _frozen(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


def _pairs(x_img: Any, x_txt: Any, what: str, least: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x_img, dtype=np.float64), np.asarray(x_txt, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise StratalignError(f"{what} needs paired 2-D arrays, got shapes {a.shape} and {b.shape}")
    if len(a) < least:
        raise StratalignError(f"{what} needs at least {least} pairs, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StratalignError(f"{what}: features contain NaN or inf")
    return a, b


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ProcrustesProjection(nn.Module):
    """One side of the Procrustes map: z = normalise((normalise(x) - mean) @ weight)."""

    def __init__(self, d_in: int, d_out: int = 512) -> None:
        super().__init__()
        _positive(d_in=d_in, d_out=d_out)
        self.mean = _frozen(d_in)
        self.weight = _frozen(d_in, d_out)
        self.config = {"kind": "procrustes", "d_in": int(d_in), "d_out": int(d_out)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) - self.mean) @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


def _pca(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, top-d principal directions as columns) of the rows of x, from the eigenvectors of the (width x width)
    scatter matrix: the SVD of the centred rows gives the same directions (up to sign, which the Procrustes map
    absorbs) and took 2-9 s for 1,328 x 384 on the 2-core machine under load (multi-threaded OpenBLAS), eigh 0.05-0.9 s."""
    mean = x.mean(0)
    c = x - mean
    _, vecs = np.linalg.eigh(c.T @ c)
    return mean, np.ascontiguousarray(vecs[:, ::-1][:, :d])


def fit_procrustes(x_img: Any, x_txt: Any, dim: int = 512) -> tuple[ProcrustesProjection, ProcrustesProjection]:
    """The (image, text) sides of orthogonal Procrustes after a PCA of each side to the smaller width
    (capped by dim and n - 1): R = argmin_{R orthogonal} |P_img R - P_txt|_F = U V^T, U S V^T = P_img^T P_txt."""
    a, b = _pairs(x_img, x_txt, "procrustes", 3)
    _positive(dim=dim)
    a, b = _unit(a), _unit(b)
    d = int(min(a.shape[1], b.shape[1], dim, len(a) - 1))
    (ma, va), (mb, vb) = _pca(a, d), _pca(b, d)
    pa, pb = (a - ma) @ va, (b - mb) @ vb
    u, _, wt = np.linalg.svd(pa.T @ pb)
    sides = []
    for mean, w, width in ((ma, va @ (u @ wt), a.shape[1]), (mb, vb, b.shape[1])):
        side = ProcrustesProjection(width, d)
        with torch.no_grad():
            side.mean.copy_(torch.from_numpy(mean))
            side.weight.copy_(torch.from_numpy(w))
        sides.append(side)
    return sides[0], sides[1]


class ASIFSide(nn.Module):
    """One side of ASIF: the relative representation of x over this side's anchors (see the module docstring)."""

    def __init__(self, d_in: int, d_out: int = 512, topk: int = ASIF_K, power: float = ASIF_POWER,
                 center: bool = False) -> None:
        super().__init__()
        _positive(d_in=d_in, d_out=d_out, topk=topk)
        if not float(power) > 0:
            raise StratalignError(f"ASIF power must be > 0, not {power!r}")
        self.anchors = _frozen(d_out, d_in)  # unit rows, one per training pair (centred rows with `center`)
        self.topk, self.power = int(min(topk, d_out)), float(power)
        self.config = {"kind": "asif", "d_in": int(d_in), "d_out": int(d_out), "topk": int(topk),
                       "power": float(power)}
        if center:  # the uncentred config (and tensors) stay as they were
            self.mean = _frozen(d_in)  # the anchors' mean unit row
            self.config["center"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        if "center" in self.config:
            x = F.normalize(x - self.mean.to(x.dtype), dim=-1)
        rows = max(1, _ASIF_CHUNK // self.anchors.shape[0])
        return torch.cat([self._relative(x[s:s + rows]) for s in range(0, len(x), rows)]) if len(x) else \
            x.new_zeros(0, self.anchors.shape[0])

    def _relative(self, x: torch.Tensor) -> torch.Tensor:
        sims = x @ self.anchors.T.to(x.dtype)
        top = sims.topk(self.topk, dim=-1)
        kept = torch.zeros_like(sims).scatter_(-1, top.indices, top.values.clamp_min(0.0).pow(self.power))
        return F.normalize(kept, dim=-1)


def fit_asif(x_img: Any, x_txt: Any, topk: int = ASIF_K, power: float = ASIF_POWER,
             center: bool = False) -> tuple[ASIFSide, ASIFSide]:
    """The (image, text) sides of ASIF with the training pairs as anchors (nothing is fitted: the anchors are
    the pairs' unit rows; with `center`, their mean subtracted and renormalised)."""
    a, b = _pairs(x_img, x_txt, "asif", 1)
    sides = []
    for x in (a, b):
        side = ASIFSide(x.shape[1], len(x), topk, power, center)
        unit = _unit(x)
        with torch.no_grad():
            if center:
                side.mean.copy_(torch.from_numpy(unit.mean(0)))
                unit = _unit(unit - unit.mean(0))
            side.anchors.copy_(torch.from_numpy(unit))
        sides.append(side)
    return sides[0], sides[1]


BASELINE_HEADS = {"procrustes": ProcrustesProjection, "asif": ASIFSide}
