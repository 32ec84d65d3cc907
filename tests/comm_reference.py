"""CoMM's step written as docs/method.md § 3.5 reads, one call of the model per (view, mask): the 3-token sequence
through the whole pre-LayerNorm block (nn.MultiheadAttention with a key padding mask), then `proj`. The reference
the batched form in stratalign.core.comm must equal (tests/core/test_comm_batched.py, benchmarks/comm.py)."""

from __future__ import annotations

import torch

from stratalign.core.comm import MASKS, CommModel, augment_features, comm_loss


def fuse_per_mask(model: CommModel, x_img: torch.Tensor, x_txt: torch.Tensor, mask: str = "both") -> torch.Tensor:
    """The CLS output of the block run on all 3 tokens, the hidden modality removed from attention."""
    n = x_img.shape[0]
    seq = torch.stack([model.cls.expand(n, -1, -1)[:, 0], model.img_in(x_img), model.txt_in(x_txt)], dim=1)
    pad = torch.zeros(n, 3, dtype=torch.bool, device=seq.device)
    if mask == "image":
        pad[:, 2] = True
    elif mask == "text":
        pad[:, 1] = True
    h = model.ln1(seq)
    seq = seq + model.attn(h, h, h, key_padding_mask=pad if mask != "both" else None, need_weights=False)[0]
    seq = seq + model.mlp(model.ln2(seq))
    return model.ln_f(seq)[:, 0]


def step_loss_per_view(model: CommModel, x_img: torch.Tensor, x_txt: torch.Tensor, std_img: torch.Tensor,
                       std_txt: torch.Tensor, tau: float = 0.1, drop: float = 0.1, noise: float = 0.1,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Two augmented views, each mask through `fuse_per_mask` and `proj` (6 calls), then `comm_loss`."""
    views = []
    for _ in range(2):
        a = augment_features(x_img, std_img, drop, noise, generator)
        t = augment_features(x_txt, std_txt, drop, noise, generator)
        views.append({m: model.proj(fuse_per_mask(model, a, t, m)) for m in MASKS})
    return comm_loss(views[0], views[1], tau)
