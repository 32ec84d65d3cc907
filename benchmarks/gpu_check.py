"""GPU check: stratalign's CUDA paths against its CPU results, with timings, on random models and features.

On a CUDA machine it runs, each on the CPU (float32, the reference) and on the GPU:
- extraction: a random-init DINOv2-style ViT (transformers Dinov2Model from a config, no download) wrapped in
  stratalign's HFEncoder, batches in pinned memory, through the extraction's own forward (ShardEncoder.forward:
  non_blocking copy, bf16 autocast, pooled float32 out). Tolerance: per layer, the mean cosine of the GPU rows to
  the CPU rows >= 0.99 and the worst row >= 0.95 (bf16 keeps 8 mantissa bits; errors grow with depth);
- FAISS on the GPU (only when faiss-gpu sees a device, faiss.get_num_gpus() > 0): the self-excluded kNN graph
  (core.knn.knn_indices) and the layer matrices (core.similarity.layer_similarity, mutual_knn + cka). Tolerance:
  >= 99.9 % of kNN indices identical (the CPU and GPU kernels may break float32 near-ties differently) and the
  matrices within 1e-3;
- training: a few hundred steps of `--runs` clip+structure runs trained batched on random paired features
  (train.train_many: stacked heads in one loop; bf16 autocast on the GPU, float32 on the CPU). Tolerance: the mean
  best validation CLIP loss within 5 % relative (autocast changes the trajectory, not where it goes).
It prints a table (value on each device, the difference, the tolerance, CPU s, GPU s, speed-up) and exits 1 when
a check fails. Timings synchronise the GPU before reading the clock and exclude a warm-up pass.

Without CUDA it prints one line and exits 0: no GPU: nothing to check (torch.cuda.is_available() is False).

Run: python benchmarks/gpu_check.py [--rows 2048] [--layers 12] [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

NO_GPU = "no GPU: nothing to check (torch.cuda.is_available() is False)"


@dataclass
class Row:
    """One line of the table."""

    check: str
    cpu: str
    gpu: str
    diff: float
    tolerance: str
    ok: bool
    cpu_s: float
    gpu_s: float


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """fn() and its seconds; on CUDA the queue is drained before starting and before stopping the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


# --- extraction ------------------------------------------------------------------------------------
def random_vit(layers: int = 12, hidden: int = 384, image: int = 224, seed: int = 0) -> torch.nn.Module:
    """A DINOv2-S-shaped ViT with random weights (no download)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       mlp_ratio=4, image_size=image, patch_size=14)
    return Dinov2Model(cfg).eval()


def pooled_features(model: torch.nn.Module, pixels: torch.Tensor, device: str, batch: int = 32,
                    pooling: str = "cls") -> tuple[list[np.ndarray], float]:
    """Every layer's pooled features (float32 numpy) of `pixels` through stratalign's extraction forward on
    `device`: pinned host batches on CUDA, non_blocking copies, bf16 autocast. Returns (layers, seconds), the
    seconds excluding a first warm-up batch."""
    import copy

    from stratalign.encoders.base import ImageTransform
    from stratalign.encoders.hf import HFEncoder
    from stratalign.stages.extract.shards import ShardEncoder

    dev = torch.device(device)
    size = int(model.config.image_size)  # the transform only serves the encoder's one-image layout probe
    enc = HFEncoder("gpu-check-vit", copy.deepcopy(model), "image", image_transform=ImageTransform(size, size),
                    weights_sha="random", preprocessing={}, device=dev)
    entry = SimpleNamespace(spec=SimpleNamespace(pooling=pooling))  # ShardEncoder reads only the pooling
    precision = "fp32" if dev.type == "cpu" else "bf16"  # the reference in fp32, the device under bf16 autocast
    worker = ShardEncoder(enc, None, [entry], SimpleNamespace(precision=precision), dev, prepare=lambda rows: None)
    chunks = [pixels[s:s + batch] for s in range(0, len(pixels), batch)]
    host = [{"pixel_values": c.pin_memory() if dev.type == "cuda" else c} for c in chunks]
    worker.forward(host[0])  # warm-up: kernels, autotuning, allocator
    parts, seconds = timed(lambda: [worker.forward(b)[pooling] for b in host], device)
    return [np.concatenate(layer) for layer in zip(*parts)], seconds


def compare_features(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(worst per-layer mean row cosine, worst single row cosine) of `got` against `ref`."""
    means, worst = [], []
    for a, b in zip(ref, got):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        cos = (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)
        means.append(cos.mean())
        worst.append(cos.min())
    return float(min(means)), float(min(worst))


def check_extraction(rows: int, layers: int, device: str, image: int = 224) -> Row:
    model = random_vit(layers=layers, image=image)
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, 3, image, image), dtype=np.float32))
    ref, cpu_s = pooled_features(model, pixels, "cpu")
    got, dev_s = pooled_features(model, pixels, device)
    mean_cos, worst_cos = compare_features(ref, got)
    ok = mean_cos >= 0.99 and worst_cos >= 0.95
    return Row(f"extraction ViT {layers}L x {rows} rows (cls)", "fp32", "bf16 autocast", 1 - mean_cos,
               "mean cos >= 0.99, min >= 0.95", ok, cpu_s, dev_s)


# --- FAISS -----------------------------------------------------------------------------------------
def faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return int(getattr(faiss, "get_num_gpus", lambda: 0)()) if hasattr(faiss, "StandardGpuResources") else 0


def check_knn(rows: int, dim: int, k: int, device: str) -> Row:
    from stratalign.core.knn import knn_indices

    x = np.random.default_rng(1).standard_normal((rows, dim), dtype=np.float32)
    ref, cpu_s = timed(lambda: knn_indices(x, k, device="cpu"), "cpu")
    got, dev_s = timed(lambda: knn_indices(x, k, device=device), device)
    same = float((np.asarray(ref) == np.asarray(got)).mean())
    return Row(f"kNN graph {rows} x {dim}, k={k}", "faiss cpu", "faiss gpu", 1 - same, ">= 99.9 % indices equal",
               same >= 0.999, cpu_s, dev_s)


def check_layer_matrix(rows: int, n_layers: int, dim: int, device: str) -> Row:
    from stratalign.core.similarity import layer_similarity

    rng = np.random.default_rng(2)
    base = rng.standard_normal((rows, dim), dtype=np.float32)
    vis = [base + rng.standard_normal((rows, dim), dtype=np.float32) * (i + 1) for i in range(n_layers)]
    txt = [base @ rng.standard_normal((dim, dim), dtype=np.float32) * 0.1 + rng.standard_normal(
        (rows, dim), dtype=np.float32) for _ in range(n_layers)]
    metrics = ("mutual_knn", "cka")
    ref, cpu_s = timed(lambda: layer_similarity(vis, txt, metrics, device="cpu"), "cpu")
    got, dev_s = timed(lambda: layer_similarity(vis, txt, metrics, device=device), device)
    diff = max(float(np.abs(ref[m] - got[m]).max()) for m in metrics)
    return Row(f"layer matrices {n_layers}x{n_layers}, n={rows}", "faiss cpu", "faiss gpu", diff, "|diff| <= 1e-3",
               diff <= 1e-3, cpu_s, dev_s)


# --- training --------------------------------------------------------------------------------------
def paired_features(rows: int, dim: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random image features and text features that share a linear signal (so that training has a target)."""
    rng = np.random.default_rng(seed)
    x_img = rng.standard_normal((rows, dim), dtype=np.float32)
    mix = rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)
    x_txt = x_img @ mix + 0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
    return x_img, x_txt


def train_group(x_img: np.ndarray, x_txt: np.ndarray, steps: int, device: str, runs: int, batch: int = 1024,
                dim: int = 256) -> tuple[float, float]:
    """(mean best validation CLIP loss, seconds) of `runs` clip+structure runs (seeds 0..runs-1, lambda 1..4)
    trained batched (train.train_many: one loop, stacked heads) on the first 90 % of the rows."""
    from stratalign.train import RunSpec, TrainConfig, train_many

    n = len(x_img)
    tr, va = np.arange(int(n * 0.9)), np.arange(int(n * 0.9), n)
    specs = [RunSpec(TrainConfig(objective="clip+structure", dim=dim, batch_size=batch, max_steps=steps, seed=s,
                                 lam=float(1 + s % 4), warmup_steps=max(1, steps // 6), patience=steps,
                                 eval_every=max(1, steps // 30), device=device, amp=True, select="clip_loss"), tr, va)
             for s in range(runs)]
    results, seconds = timed(lambda: train_many(x_img, x_txt, specs), device)
    return float(np.mean([r.best_val_clip for r in results])), seconds


def check_training(rows: int, dim: int, steps: int, device: str, runs: int) -> Row:
    x_img, x_txt = paired_features(rows, dim)
    if device.startswith("cuda"):
        train_group(x_img[:512], x_txt[:512], 5, device, 2, batch=128, dim=32)  # warm-up: CUDA context, kernels
    ref, cpu_s = train_group(x_img, x_txt, steps, "cpu", runs)
    got, dev_s = train_group(x_img, x_txt, steps, device, runs)
    rel = abs(got - ref) / max(abs(ref), 1e-12)
    return Row(f"train {runs} clip+structure runs batched, {steps} steps, n={rows}", f"val clip {ref:.4f}",
               f"val clip {got:.4f}", rel, "relative <= 5 %", rel <= 0.05, cpu_s, dev_s)


# --- report ----------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = ["check", "cpu", "gpu", "diff", "tolerance", "ok", "cpu s", "gpu s", "speed-up"]
    lines = [header] + [[r.check, r.cpu, r.gpu, f"{r.diff:.2e}", r.tolerance, "yes" if r.ok else "NO",
                         f"{r.cpu_s:.2f}", f"{r.gpu_s:.2f}", f"{r.cpu_s / r.gpu_s:.1f}x" if r.gpu_s > 0 else "-"]
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="rows of the kNN / layer / training checks")
    ap.add_argument("--images", type=int, default=256, help="images through the ViT")
    ap.add_argument("--layers", type=int, default=12, help="ViT blocks")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--runs", type=int, default=8, help="runs trained batched")
    ap.add_argument("--device", default="cuda", help="the CUDA device to check")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    dev = args.device
    print(f"device {dev}: {torch.cuda.get_device_name(torch.device(dev))}; torch {torch.__version__}; "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}; faiss GPUs: {faiss_gpus()}", flush=True)
    rows = [check_extraction(args.images, args.layers, dev)]
    if faiss_gpus() > 0:
        rows += [check_knn(args.rows * 4, 384, 10, dev), check_layer_matrix(args.rows, 6, 384, dev)]
    else:
        print("faiss: no GPU index (faiss.get_num_gpus() == 0 or faiss-cpu installed): kNN checks skipped")
    rows.append(check_training(args.rows * 4, 384, args.steps, dev, args.runs))
    print(table(rows))
    failed = [r.check for r in rows if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
