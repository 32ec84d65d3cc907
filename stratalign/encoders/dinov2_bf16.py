"""The bf16 forward of a transformers `Dinov2Model` on CPU, for extraction under `--precision bf16`.

Why: under plain CPU bf16 autocast the model ran only ~1.3x faster than fp32 on this project's 2-core CPU
(avx512_bf16), far from the ~2x of its bf16 matrix products. Profiled (torch.profiler, batch 32, 224 px):
- autocast re-casts every Linear weight and bias on every forward (its cast cache holds only tensors that
  require grad; a frozen encoder's do not), and casts each LayerNorm output three times (q, k and v);
- aten's bf16 addmm copies the bias into its output before the product, and reads unpacked weights;
- the CPU flash-attention kernel (SDPA) is *slower* in bf16 than in fp32 at 257 tokens x 64 dims
  (~85 against ~72 ms a layer at batch 32, one thread), a quarter of the whole bf16 forward.
What this path does instead (numbers are the same kind as autocast's: bf16 products, fp32 accumulation):
- the Linear weights are cast to bf16 once and packed for oneDNN (`mkldnn._linear_pointwise`, the op
  PyTorch's inductor uses on CPU), with q, k, v as one product and the attention scale folded into q;
  the MLP's exact (erf) GELU is fused into fc1;
- attention as two bf16 batched products around a softmax (computed in fp32 inside, stored in bf16), the
  key bias left out (softmax ignores it; the scores' bf16 rounding then costs what flash attention's does);
- the residual stream, the LayerNorms and the LayerScale additions stay float32: every hidden state that
  extraction pools is float32, rounded only where a product reads its input;
- the embeddings run as the model's own module under the caller's autocast (its patch Conv in bf16).
Measured by `benchmarks/extract.py --precision-axis` (see its docstring for the numbers). The fp32 forward
never comes here: it is the transformers model itself, unchanged.

Only the layout this file knows is taken (`supports`): exact GELU MLP (no SwiGLU), LayerScale, no attention
mask, CPU tensors; anything else runs the transformers model under autocast as before.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is a Dinov2Model whose blocks this file computes exactly as transformers lays them out."""
    if type(model).__name__ != "Dinov2Model":
        return False
    cfg = getattr(model, "config", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if cfg is None or layers is None or len(layers) == 0:
        return False
    if getattr(cfg, "hidden_act", None) != "gelu" or getattr(cfg, "use_swiglu_ffn", False):
        return False
    block = layers[0]
    need = ("norm1", "attention", "layer_scale1", "norm2", "mlp", "layer_scale2")
    if not all(hasattr(block, n) for n in need) or not isinstance(block.drop_path, torch.nn.Identity):
        return False
    att = block.attention
    return all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(block.mlp, "fc1")


def bf16_autocast_on(device: torch.device) -> bool:
    """Whether a bf16 autocast is active for this (CPU) device: the caller asked for the bf16 forward."""
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _onednn_linear() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


class _Linear:
    """One bf16 Linear whose weight is cast (and packed for oneDNN) once; `gelu` fuses the exact GELU."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], onednn: bool) -> None:
        w = torch.cat([x.detach().float() for x in weights])
        b = torch.cat([x.detach().float() if x is not None else torch.zeros(len(wi), device=wi.device)
                       for x, wi in zip(biases, weights)])
        self.onednn = onednn
        self.w = w.to(torch.bfloat16).contiguous()
        if onednn:
            self.w = torch.ops.mkldnn._reorder_linear_weight(self.w)
        self.b = b.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
        y = F.linear(x, self.w, self.b)
        return F.gelu(y) if gelu else y


class Dinov2Bf16:
    """Hidden states of a Dinov2Model (embeddings, then every block's output) from the bf16 path above."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.packs = 0  # how many times the weights were cast and packed (once per runner)
        self._blocks: list[dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _packed(self) -> list[dict[str, Any]]:
        with self._lock:
            if self._blocks is None:
                onednn = _onednn_linear()
                blocks = []
                for layer in self.model.encoder.layer:
                    a = layer.attention
                    scale = float(getattr(a, "scaling", a.head_dim ** -0.5))
                    # q, k, v as one product; the 1/sqrt(d) of the scores folded into q (exact for d = 64).
                    # The key bias is left out: it adds q_i . b_k to every score of row i, which the softmax
                    # ignores, and without it the scores are smaller, so their bf16 rounding costs less
                    # (Twemoji, worst layer: cosine to fp32 0.99995 with it, 0.99997 without, as autocast's).
                    qkv = _Linear([a.q_proj.weight * scale, a.k_proj.weight, a.v_proj.weight],
                                  [None if a.q_proj.bias is None else a.q_proj.bias * scale, None,
                                   a.v_proj.bias], onednn=onednn)
                    blocks.append({"layer": layer, "heads": a.num_attention_heads, "qkv": qkv,
                                   "o": _Linear([a.o_proj.weight], [a.o_proj.bias], onednn=onednn),
                                   "fc1": _Linear([layer.mlp.fc1.weight], [layer.mlp.fc1.bias], onednn=onednn),
                                   "fc2": _Linear([layer.mlp.fc2.weight], [layer.mlp.fc2.bias], onednn=onednn)})
                self._blocks = blocks
                self.packs += 1
            return self._blocks

    def hidden_states(self, pixel_values: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        """[embeddings, block 1 output, ...] (float32), blocks 1..n_blocks only when given."""
        blocks = self._packed()
        with torch.inference_mode():
            x = self.model.embeddings(pixel_values)  # under the caller's autocast, as the model runs it
            hidden = [x]
            with torch.autocast("cpu", enabled=False):  # the dtypes below are chosen explicitly
                for b in blocks[:n_blocks]:
                    x = _block(b, x)
                    hidden.append(x)
        return hidden


def _block(b: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """One Dinov2Layer: x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(.)); x and the result float32."""
    layer, heads = b["layer"], b["heads"]
    batch, tokens, dim = x.shape
    h = _norm(layer.norm1, x)
    q, k, v = b["qkv"](h).view(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    att = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)  # q carries the scale
    att = torch.matmul(att, v).transpose(1, 2).reshape(batch, tokens, dim)
    x = torch.addcmul(x, b["o"](att), layer.layer_scale1.lambda1)
    h = _norm(layer.norm2, x)
    return torch.addcmul(x, b["fc2"](b["fc1"](h, gelu=True)), layer.layer_scale2.lambda1)


def _norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32, its output rounded to bf16 once (the next product's input)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)


def runner_for(model: torch.nn.Module) -> Dinov2Bf16 | None:
    """The bf16 path for this model, or None when `supports` says no (the model then runs under autocast)."""
    return Dinov2Bf16(model) if supports(model) else None
