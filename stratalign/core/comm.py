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

from stratalign.core.losses import float32
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
        return self.fuse_masks(x_img, x_txt, (mask,))[0]

    def fuse_masks(self, x_img: torch.Tensor, x_txt: torch.Tensor, masks: tuple[str, ...] = MASKS) -> torch.Tensor:
        """The CLS output under each mask, (len(masks), n, dim), computing only what the CLS output reads.

        The same numbers as running the block on the 3-token sequence once per mask (tests/core/test_comm.py holds
        that loop): only the CLS row leaves the block, so its query, attention output, MLP and final LayerNorm
        are the only rows computed; the CLS token is one parameter, so its query, key and value are computed
        once for the batch; the image and text tokens' keys and values are shared by every mask (a mask only
        hides keys from the CLS query)."""
        for m in masks:
            if m not in MASKS:
                raise StratalignError(f"CoMM mask must be one of {MASKS}, not {m!r}")
        n, heads, dim = x_img.shape[0], self.attn.num_heads, self.options["dim"]
        hd = dim // heads
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        cls = self.cls[0]  # (1, dim)
        q, k0, v0 = F.linear(self.ln1(cls), w, b).split(dim, dim=-1)  # the CLS token: (1, dim) each
        tokens = self.ln1(torch.stack([self.img_in(x_img), self.txt_in(x_txt)]))  # (2, n, dim)
        k, v = F.linear(tokens, w[dim:], b[dim:]).split(dim, dim=-1)  # (2, n, dim) each
        q = q.view(heads, hd) * hd ** -0.5
        s_cls = (q * k0.view(heads, hd)).sum(-1)  # (heads,)
        s_tok = torch.einsum("tnhd,hd->tnh", k.view(2, n, heads, hd), q)  # (2, n, heads)
        scores = torch.cat([s_cls.expand(1, n, heads), s_tok])  # (3 keys, n, heads)
        values = torch.cat([v0.view(1, 1, heads, hd).expand(1, n, heads, hd), v.view(2, n, heads, hd)])
        outs = []
        for m in masks:
            keys = _VISIBLE[m]
            p = torch.softmax(scores[keys], dim=0)  # (visible keys, n, heads)
            p = F.dropout(p, self.attn.dropout, self.training)
            outs.append(torch.einsum("knh,knhd->nhd", p, values[keys]).reshape(n, dim))
        row = cls + self.attn.out_proj(torch.stack(outs))  # (masks, n, dim)
        row = row + self.mlp(self.ln2(row))
        return self.ln_f(row)

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor, mask: str = "both") -> torch.Tensor:
        """Projected (un-normalised) 256-d output used by the loss."""
        return self.proj(self.fuse(x_img, x_txt, mask))

    def project_groups(self, fused: torch.Tensor) -> torch.Tensor:
        """The projection of (groups, n, dim) fused rows, each group as its own `proj` call would: training-mode
        BatchNorm takes each group's own batch statistics, and the running statistics move once per group, in
        group order, as that many calls would move them."""
        g, n, dim = fused.shape
        x = fused.reshape(g * n, dim)
        for layer in self.proj:
            if isinstance(layer, nn.BatchNorm1d) and layer.training:
                x = _grouped_batch_norm(layer, x.view(g, n, -1)).reshape(g * n, -1)
            else:
                x = layer(x)
        return x.view(g, n, -1)


_VISIBLE = {"image": [0, 1], "text": [0, 2], "both": [0, 1, 2]}  # the keys (CLS, image, text) each mask shows


def _grouped_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm1d of (groups, n, c) with each group's own statistics; the layer's running
    statistics updated once per group in order (torch's rule: unbiased variance, `momentum`)."""
    g, n, c = x.shape
    flat = x.transpose(0, 1).reshape(n, g * c)  # one channel per (group, feature): F.batch_norm's kernel
    weight = bn.weight.repeat(g) if bn.weight is not None else None
    bias = bn.bias.repeat(g) if bn.bias is not None else None
    out = F.batch_norm(flat, None, None, weight, bias, True, 0.0, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().float(), dim=1, unbiased=True)
            for i in range(g):
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(mean[i].to(bn.running_mean.dtype), alpha=m)
                bn.running_var.mul_(1 - m).add_(var[i].to(bn.running_var.dtype), alpha=m)
    return out.reshape(n, g, c).transpose(0, 1)


def augment_features(x: torch.Tensor, std: torch.Tensor, drop: float = 0.1, noise: float = 0.1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature-space augmentation: zero each feature with probability `drop` (no rescaling), then add
    Gaussian noise of `noise` times that dimension's standard deviation (over the training subset)."""
    if not 0.0 <= drop < 1.0 or noise < 0:
        raise StratalignError(f"augmentation needs 0 <= drop < 1 and noise >= 0, got {drop}, {noise}")
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= drop
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    return x * keep + noise * std * eps


@float32
def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR / CoMM): 2N anchors; a_i's positive is b_i, its negatives the other 2N-2 rows
    of both views; inputs are normalised here. float32 under any autocast (METHOD 3.6)."""
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
    # m = both: NCE(Z'', Z') is NCE(Z', Z'') with the anchors in another order (the same 2N terms), so it is computed once
    parts = [nt_xent(z1[m], z2["both"], tau) if m == "both"
             else 0.5 * (nt_xent(z1[m], z2["both"], tau) + nt_xent(z2[m], z1["both"], tau)) for m in MASKS]
    return torch.stack(parts).mean()


def comm_step_loss(model: CommModel, x_img: torch.Tensor, x_txt: torch.Tensor, std_img: torch.Tensor,
                   std_txt: torch.Tensor, tau: float = 0.1, drop: float = 0.1, noise: float = 0.1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Two augmented views of a batch, every mask through the model, then `comm_loss`: both views in one pass of
    the fusion block (`fuse_masks`), the 6 (view, mask) groups in one projection (`project_groups`), the same
    numbers as 6 calls of the model (views drawn in the same order from `generator`)."""
    img, txt = [], []
    for _ in range(2):
        img.append(augment_features(x_img, std_img, drop, noise, generator))
        txt.append(augment_features(x_txt, std_txt, drop, noise, generator))
    n = x_img.shape[0]
    fused = model.fuse_masks(torch.cat(img), torch.cat(txt), MASKS)  # (mask, view x n, dim)
    groups = fused.reshape(len(MASKS), 2, n, -1).transpose(0, 1).reshape(2 * len(MASKS), n, -1)  # view-major
    z = model.project_groups(groups).view(2, len(MASKS), n, -1)
    return comm_loss(dict(zip(MASKS, z[0])), dict(zip(MASKS, z[1])), tau)


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
