"""Pooling of hidden states into one vector per row (docs/method.md § 1).

| kind | `cls` | `mean` | other |
| --- | --- | --- | --- |
| ViT | token 0 | mean over patch tokens (token 0 and any register tokens excluded) | - |
| text transformer | token 0 | mean over tokens weighted by the attention mask | `eos`: last attended token |
| CNN | - | - | `avg`: global average pool over H x W |

Every function returns float32 whatever the input dtype (bf16/fp16 under autocast): sums accumulate in
float32 (`dtype=torch.float32`) so that a half-precision hidden state is never summed in half precision
and the full (b, t, d) tensor is not copied to float32 first. Inputs stay on their device.

The functions take one hidden state; `pool_layers` applies a set of poolings to every layer of one
forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from stratalign.errors import StratalignError

TOKEN_POOLINGS = ("cls", "mean", "eos")
CNN_POOLINGS = ("avg",)


def cls_pool(h: torch.Tensor) -> torch.Tensor:
    """Token 0 of a (b, t, d) hidden state -> (b, d) float32."""
    _check_tokens(h)
    return h[:, 0].to(torch.float32)


def patch_mean_pool(h: torch.Tensor, n_prefix: int = 1) -> torch.Tensor:
    """Mean over the patch tokens of a (b, t, d) ViT hidden state, the first `n_prefix` tokens (class token,
    register tokens) excluded -> (b, d) float32."""
    _check_tokens(h)
    if h.shape[1] <= n_prefix:
        raise StratalignError(f"patch mean pooling needs more than {n_prefix} tokens, got {h.shape[1]}")
    patches = h[:, n_prefix:]
    return patches.sum(dim=1, dtype=torch.float32) / patches.shape[1]


def masked_mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens weighted by the attention mask (sentence-transformers mean pooling) -> (b, d) float32.

    A row whose mask is all zero gives zeros (the count is clamped to 1e-9 as sentence-transformers does,
    and the masked sum is 0)."""
    _check_tokens(h)
    if attention_mask.shape != h.shape[:2]:
        raise StratalignError(f"attention mask of shape {tuple(attention_mask.shape)} does not match hidden "
                              f"state of shape {tuple(h.shape)}")
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # 0/1: exact in any dtype
    summed = (h * m).sum(dim=1, dtype=torch.float32)
    count = attention_mask.to(torch.float32).sum(dim=1, keepdim=True).clamp_min(1e-9)
    return summed / count


def eos_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last attended token of each row (end-of-text token of right-padded causal text models such as
    the CLIP text tower, whose token 0 does not depend on the text) -> (b, d) float32."""
    _check_tokens(h)
    positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
    last = torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last].to(torch.float32)


def spatial_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool of a (b, c, h, w) feature map -> (b, c) float32."""
    if x.ndim != 4:
        raise StratalignError(f"average pooling needs a (b, c, h, w) feature map, got shape {tuple(x.shape)}")
    return x.sum(dim=(2, 3), dtype=torch.float32) / (x.shape[2] * x.shape[3])


def _check_tokens(h: torch.Tensor) -> None:
    if h.ndim != 3:
        raise StratalignError(f"token pooling needs a (batch, tokens, dim) hidden state, got shape {tuple(h.shape)}")


def pool_layers(hidden_states: Sequence[torch.Tensor], poolings: Sequence[str], *, kind: str,
                attention_mask: torch.Tensor | None = None, n_prefix: int = 1) -> dict[str, list[torch.Tensor]]:
    """Apply each pooling to every layer. kind: "vision" (ViT tokens), "text" (tokens + mask) or "cnn"
    (feature maps). Returns {pooling: [layer 0, layer 1, ...]} of (b, d_l) float32 tensors."""
    out: dict[str, list[torch.Tensor]] = {}
    for p in dict.fromkeys(poolings):
        if kind == "cnn":
            if p != "avg":
                raise StratalignError(f"pooling {p!r} is not defined for CNN feature maps; use avg")
            out[p] = [spatial_avg_pool(h) for h in hidden_states]
        elif kind == "vision":
            if p == "cls":
                out[p] = [cls_pool(h) for h in hidden_states]
            elif p == "mean":
                out[p] = [patch_mean_pool(h, n_prefix) for h in hidden_states]
            else:
                raise StratalignError(f"pooling {p!r} is not defined for vision transformers; use cls or mean")
        elif kind == "text":
            if attention_mask is None and p in ("mean", "eos"):
                raise StratalignError(f"text pooling {p!r} needs the attention mask")
            if p == "cls":
                out[p] = [cls_pool(h) for h in hidden_states]
            elif p == "mean":
                out[p] = [masked_mean_pool(h, attention_mask) for h in hidden_states]
            elif p == "eos":
                out[p] = [eos_pool(h, attention_mask) for h in hidden_states]
            else:
                raise StratalignError(f"pooling {p!r} is not defined for text transformers; use mean, cls or eos")
        else:
            raise ValueError(f"unknown pooling kind {kind!r}")
    return out
