"""Embeddings of trained models: normalised head outputs (VIB: the mean) and CoMM fused features."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stratalign.core.comm import CommModel
from stratalign.core.comm import fused_features as _fused_features
from stratalign.core.heads import AlignedHeads, VariationalHead
from stratalign.errors import StratalignError


def head_embedding(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A head's embedding of x: the output, or z = normalise(mu) for a variational head."""
    if isinstance(head, VariationalHead):
        return head.embed(x)
    return head(x)


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray | torch.Tensor, modality: str, batch_size: int = 8192) -> torch.Tensor:
    """Normalised embeddings of rows x through the image or text head (VIB: z = normalise(mu)),
    float32 on the CPU."""
    if not isinstance(model, AlignedHeads):
        raise StratalignError(f"embed needs aligned heads, not {type(model).__name__} (CoMM: use fused_features)")
    head = model.head(modality)
    d_in = head.config["d_in"]
    if x.ndim != 2 or x.shape[1] != d_in:
        raise StratalignError(f"{modality} head expects (n, {d_in}) features, got {tuple(x.shape)}")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(x), batch_size):
            chunk = x[s:s + batch_size]
            t = chunk.float() if isinstance(chunk, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(chunk, dtype=np.float32))
            out.append(head_embedding(head, t.to(dev)).float().cpu())
    finally:
        model.train(was)
    width = head.config["d_out"]
    return torch.cat(out) if out else torch.zeros(0, width)


def embed_features(model: nn.Module, x: np.ndarray, modality: str) -> np.ndarray:
    """`embed` as a float32 numpy array."""
    return embed(model, x, modality).numpy()


def fused_features(model: nn.Module, x_img: np.ndarray, x_txt: np.ndarray) -> np.ndarray:
    """The CoMM fused CLS output of each pair (for the linear probe)."""
    if not isinstance(model, CommModel):
        raise StratalignError(f"fused_features needs a CoMM model, not {type(model).__name__}")
    return _fused_features(model, x_img, x_txt)
