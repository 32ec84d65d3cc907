"""CoMM on cached features (docs/method.md § 3.5).

A fusion module reads one token per modality (a Linear from each cached pooled layer to d), prepends
a learned CLS token, runs one pre-LayerNorm transformer block (8 heads), applies a final LayerNorm (as the
original models/mmfusion.py does before taking the CLS token) and returns the CLS output;
a projection MLP (Linear-BN-ReLU-Linear-BN-ReLU-Linear) maps it to 256-d for the loss. A masked
modality is removed from attention (key padding), so "image only" really sees only the image token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stratalign.errors import StratalignError

MASKS = ("image", "text", "both")


class CommModel(nn.Module):
    """Fusion encoder + projection head; `config` rebuilds it (`CommModel(**config["options"])`)."""

    def __init__(self, d_img: int, d_txt: int, dim: int = 512, heads: int = 8, out_dim: int = 256,
                 mlp_ratio: int = 4, dropout: float = 0.0, final_norm: bool = True) -> None:
        super().__init__()
        for name, v in (("d_img", d_img), ("d_txt", d_txt), ("dim", dim), ("heads", heads),
                        ("out_dim", out_dim), ("mlp_ratio", mlp_ratio)):
            if not isinstance(v, int) or v < 1:
                raise StratalignError(f"CoMM {name} must be a positive integer, not {v!r}")
        if dim % heads:
            raise StratalignError(f"CoMM dim ({dim}) must be divisible by heads ({heads})")
        self.img_in = nn.Linear(d_img, dim)
        self.txt_in = nn.Linear(d_txt, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))
        # the final LayerNorm of the original fusion; final_norm=False rebuilds models saved before it existed
        self.ln_f = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                                  nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                                  nn.Linear(dim, out_dim))
        self.options = {"d_img": d_img, "d_txt": d_txt, "dim": dim, "heads": heads, "out_dim": out_dim,
                        "mlp_ratio": mlp_ratio, "dropout": float(dropout), "final_norm": bool(final_norm)}

    @property
    def config(self) -> dict[str, Any]:
        return {"type": "comm", "options": dict(self.options)}

    def fuse(self, x_img: torch.Tensor, x_txt: torch.Tensor, mask: str = "both") -> torch.Tensor:
        """CLS output of the fusion block (after the final LayerNorm); mask in image | text | both (which tokens are visible)."""
        if mask not in MASKS:
            raise StratalignError(f"CoMM mask must be one of {MASKS}, not {mask!r}")
        n = x_img.shape[0]
        seq = torch.stack([self.cls.expand(n, -1, -1)[:, 0], self.img_in(x_img), self.txt_in(x_txt)], dim=1)
        pad = torch.zeros(n, 3, dtype=torch.bool, device=seq.device)
        if mask == "image":
            pad[:, 2] = True
        elif mask == "text":
            pad[:, 1] = True
        h = self.ln1(seq)
        seq = seq + self.attn(h, h, h, key_padding_mask=pad if mask != "both" else None,
                              need_weights=False)[0]
        seq = seq + self.mlp(self.ln2(seq))
        return self.ln_f(seq)[:, 0]

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor, mask: str = "both") -> torch.Tensor:
        """Projected (un-normalised) 256-d output used by the loss."""
        return self.proj(self.fuse(x_img, x_txt, mask))


def augment_features(x: torch.Tensor, std: torch.Tensor, drop: float = 0.1, noise: float = 0.1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature-space augmentation: zero each feature with probability `drop` (no rescaling), then add
    Gaussian noise of `noise` times that dimension's standard deviation (over the training subset)."""
    if not 0.0 <= drop < 1.0 or noise < 0:
        raise StratalignError(f"augmentation needs 0 <= drop < 1 and noise >= 0, got {drop}, {noise}")
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= drop
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    return x * keep + noise * std * eps


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR / CoMM): 2N anchors; a_i's positive is b_i, its negatives the other 2N-2 rows
    of both views; inputs are normalised here."""
    if a.shape != b.shape or a.ndim != 2:
        raise StratalignError(f"nt_xent: views must share one 2-D shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    n = a.shape[0]
    z = torch.cat([a, b], dim=0)
    s = z @ z.T / tau
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=s.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(s.device)
    return F.cross_entropy(s, target)


def comm_loss(z1: dict[str, torch.Tensor], z2: dict[str, torch.Tensor], tau: float = 0.1) -> torch.Tensor:
    """L = mean over m in {image, text, both} of 1/2 [NCE(Z_m', Z'') + NCE(Z_m'', Z')], where Z', Z''
    are the full ("both") outputs of views 1 and 2 and Z_m the view with mask m."""
    for d, name in ((z1, "z1"), (z2, "z2")):
        missing = [m for m in MASKS if m not in d]
        if missing:
            raise StratalignError(f"comm_loss: {name} lacks masks {missing}")
    parts = [0.5 * (nt_xent(z1[m], z2["both"], tau) + nt_xent(z2[m], z1["both"], tau)) for m in MASKS]
    return torch.stack(parts).mean()


def comm_step_loss(model: CommModel, x_img: torch.Tensor, x_txt: torch.Tensor, std_img: torch.Tensor,
                   std_txt: torch.Tensor, tau: float = 0.1, drop: float = 0.1, noise: float = 0.1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Two augmented views of a batch, every mask through the model, then `comm_loss`."""
    views = []
    for _ in range(2):
        a = augment_features(x_img, std_img, drop, noise, generator)
        t = augment_features(x_txt, std_txt, drop, noise, generator)
        views.append({m: model(a, t, m) for m in MASKS})
    return comm_loss(views[0], views[1], tau)


@torch.no_grad()
def fused_features(model: CommModel, x_img: np.ndarray | torch.Tensor, x_txt: np.ndarray | torch.Tensor,
                   batch_size: int = 4096) -> np.ndarray:
    """The fused CLS output (both modalities visible) of every pair, float32 numpy, for a linear probe."""
    if len(x_img) != len(x_txt):
        raise StratalignError(f"fused_features: {len(x_img)} image rows but {len(x_txt)} text rows")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(x_img), batch_size):
            a = torch.as_tensor(np.asarray(x_img[s:s + batch_size], dtype=np.float32)
                                if not isinstance(x_img, torch.Tensor) else x_img[s:s + batch_size].float())
            t = torch.as_tensor(np.asarray(x_txt[s:s + batch_size], dtype=np.float32)
                                if not isinstance(x_txt, torch.Tensor) else x_txt[s:s + batch_size].float())
            out.append(model.fuse(a.to(dev), t.to(dev)).float().cpu().numpy())
    finally:
        model.train(was)
    width = model.options["dim"]
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)
