"""The cost of unpaired rows in the R_S batches (docs/method.md § 3.11): clip+structure against
clip+structure+unpaired at the demo's measurement (n = 200 pairs, the CPU preset's batch, u = 256 unpaired rows of
each modality), on random features of the demo's widths (DINOv2-S 384-d, MiniLM 384-d).

Each step of the unpaired run embeds u more rows per modality and takes R_S over b + u rows instead of b, so its
step costs more; the CLIP loss is the same. Variants alternate, --repeats times, with the same fixed number of steps
(no early stop); the ratio of medians is what to read (the machine may be shared: see `uptime`).

Run: python benchmarks/unpaired.py [--steps 60] [--repeats 3] [--unpaired 256]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from stratalign.train import TrainConfig, train_heads

D, N_PAIRS, N_VAL, N_UNPAIRED = 384, 200, 100, 1128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unpaired", type=int, default=256)
    args = ap.parse_args()
    g = np.random.default_rng(0)
    xi, xt = (g.standard_normal((N_PAIRS + N_VAL, D), dtype=np.float32) for _ in range(2))
    tables = tuple(g.standard_normal((N_UNPAIRED, D), dtype=np.float32) for _ in range(2))
    tr, va = np.arange(N_PAIRS), np.arange(N_PAIRS, N_PAIRS + N_VAL)
    common = dict(batch_size=256, max_steps=args.steps, eval_every=args.steps, patience=10 * args.steps,
                  warmup_steps=0, lam=10.0, device="cpu")
    variants = {"clip+structure": (TrainConfig(objective="clip+structure", **common), None),
                "clip+structure+unpaired": (TrainConfig(objective="clip+structure+unpaired", unpaired=args.unpaired,
                                                        **common), tables)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (cfg, unpaired) in variants.items():
            t0 = time.perf_counter()
            res = train_heads(xi, xt, tr, va, cfg, unpaired=unpaired)
            times[name].append(1000 * (time.perf_counter() - t0) / res.steps_taken)
    print(f"load average {os.getloadavg()[0]:.1f}; n={N_PAIRS} pairs, batch {min(256, N_PAIRS)}, "
          f"u={args.unpaired} unpaired rows a modality, {args.steps} steps, {args.repeats} alternated repeats")
    for name, ms in times.items():
        print(f"{name:26s} ms/step {' '.join(f'{m:.1f}' for m in ms)}  median {np.median(ms):.1f}")
    ratio = np.median(times["clip+structure+unpaired"]) / np.median(times["clip+structure"])
    print(f"ratio unpaired / paired-only: {ratio:.2f}")


if __name__ == "__main__":
    main()
