"""Trainer throughput: stratalign's index-permutation trainer vs a plain DataLoader(TensorDataset) loop.

Both train two linear heads (384-d -> 512-d) with the same loss (clip, and clip+structure of docs/method.md § 3.2),
AdamW, cosine schedule, per-head grad clip 1.0, batch 4096, for the same number of optimiser steps; the
best of --repeats interleaved runs is reported (the machine may be shared). Then the stratalign trainer
alone at n = 1k, 10k, 100k for a fixed number of steps: the cost of a step does not grow with n (batches
are index permutations of one resident tensor), only the one-off setup does; s/epoch is extrapolated.

Run: python benchmarks/train.py [--steps 3] [--repeats 2] [--scale-steps 2] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from stratalign.core.heads import LinearHead
from stratalign.core.losses import clip_loss, lambda_at, structure_regularizer
from stratalign.train import TrainConfig, train_heads

D_IN, D_OUT = 384, 512
BATCH = 4096


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, D_IN), dtype=np.float32).astype(np.float16),
            rng.standard_normal((n, D_IN), dtype=np.float32).astype(np.float16))


def dataloader_loop(xi: np.ndarray, xt: np.ndarray, steps: int, objective: str, seed: int = 0,
                    batch: int | None = None) -> float:
    """The straightforward PyTorch way: TensorDataset + shuffling DataLoader, same loss and optimiser."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ds = TensorDataset(torch.from_numpy(xi.astype(np.float32)), torch.from_numpy(xt.astype(np.float32)))
    loader = DataLoader(ds, batch_size=min(batch or BATCH, len(ds)), shuffle=True, drop_last=True)
    hi, ht = LinearHead(D_IN, D_OUT), LinearHead(D_IN, D_OUT)
    opt = torch.optim.AdamW(list(hi.parameters()) + list(ht.parameters()), lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    step = 0
    while step < steps:
        for a, t in loader:
            zi, zt = hi(a), ht(t)
            loss = clip_loss(zi, zt)
            if objective == "clip+structure":
                reg = 0.5 * (structure_regularizer(a, zi) + structure_regularizer(t, zt))
                loss = loss + lambda_at(step, 10.0, 0) * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hi.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(ht.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return time.perf_counter() - t0


def stratalign_loop(xi: np.ndarray, xt: np.ndarray, steps: int, objective: str = "clip+structure",
                    n_val: int = 256, batch: int | None = None) -> tuple[float, float]:
    """train_heads end to end (checks, device copy, validation at start and end included).
    Returns (total seconds, seconds inside the optimisation loop)."""
    n = len(xi) - n_val
    cfg = TrainConfig(objective=objective, head="linear", dim=D_OUT, batch_size=batch or BATCH, max_steps=steps,
                      eval_every=steps, patience=10 * steps, warmup_fraction=0.0, device="cpu")
    t0 = time.perf_counter()
    res = train_heads(xi, xt, np.arange(n), np.arange(n, n + n_val), cfg)
    assert res.steps_taken == steps
    return time.perf_counter() - t0, res.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is reported")
    ap.add_argument("--scale-steps", type=int, default=2, help="optimiser steps per run in the scaling table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu; linear heads {D_IN}->{D_OUT}, "
          f"batch {BATCH}, {args.steps} steps per run, best of {args.repeats}")

    xi, xt = data(10_000 + 256)
    stratalign_loop(xi[:1024], xt[:1024], 2, n_val=64)  # warm-up: imports, allocator
    pairs = args.steps * BATCH
    print(f"\n10k pairs, {args.steps} steps ({pairs} pairs seen per run)")
    print(f"{'objective':<16}{'trainer':<28}{'s/run (2 heads)':>16}{'s/head':>9}{'pairs/s':>10}{'ratio':>8}")
    for objective in ("clip", "clip+structure"):
        ours, base = [], []
        for _ in range(args.repeats):
            ours.append(stratalign_loop(xi, xt, args.steps, objective)[0])
            base.append(dataloader_loop(xi[:10_000], xt[:10_000], args.steps, objective))
        o, b = min(ours), min(base)
        print(f"{objective:<16}{'stratalign train_heads':<28}{o:>16.2f}{o / 2:>9.2f}{pairs / o:>10.0f}{b / o:>7.2f}x")
        print(f"{'':<16}{'DataLoader(TensorDataset)':<28}{b:>16.2f}{b / 2:>9.2f}{pairs / b:>10.0f}{1.0:>7.2f}x")

    small, steps_small = 256, 40
    ours = min(stratalign_loop(xi, xt, steps_small, "clip+structure", batch=small)[0] for _ in range(args.repeats))
    base = min(dataloader_loop(xi[:10_000], xt[:10_000], steps_small, "clip+structure", batch=small)
               for _ in range(args.repeats))
    p = steps_small * small
    print(f"\n10k pairs, batch {small}, {steps_small} steps (per-step data handling is visible here)")
    print(f"{'clip+structure':<16}{'stratalign train_heads':<28}{ours:>16.2f}{ours / 2:>9.2f}{p / ours:>10.0f}"
          f"{base / ours:>7.2f}x")
    print(f"{'':<16}{'DataLoader(TensorDataset)':<28}{base:>16.2f}{base / 2:>9.2f}{p / base:>10.0f}{1.0:>7.2f}x")

    print(f"\nscaling with n: stratalign train_heads, clip+structure, {args.scale_steps} steps, batch min(4096, n)")
    print(f"{'n':>8}{'total s':>9}{'loop s':>8}{'s/step':>8}{'pairs/s':>9}{'est. s/epoch':>13}")
    for n in (1_000, 10_000, 100_000):
        a, b = data(n + 256, seed=1)
        total, loop = stratalign_loop(a, b, args.scale_steps)
        bsz = min(BATCH, n)
        per = loop / args.scale_steps
        print(f"{n:>8}{total:>9.2f}{loop:>8.2f}{per:>8.3f}{bsz / per:>9.0f}{per * (n // bsz):>13.1f}")


if __name__ == "__main__":
    main()
