"""Sweep throughput: batched training (run_sweep) vs the same cells one train_run at a time, same process.

1. The demo's grid (DemoConfig: 5 objectives x n in {200, 500, all} x seeds x layer rules, 81 cells with 3
   seeds) on a copy of a store that holds the demo's features (default /work/base/store; its runs/ are
   removed in the copies): batched into copy A, one by one into copy B. The numbers are checked: every
   float metric and every weight of each run agree to --tol. `--seeds 15` is the 5x larger grid.
2. S = 1, 8, 32, 128 runs of 1,000 synthetic pairs (384-d -> 512-d linear heads, clip, batch 256,
   fixed 100 steps): seconds per run, batched, against S = 1.
The last line is `speedup: X.XXx` (runs/s batched / runs/s one by one, the grid of part 1).

Run: python benchmarks/sweep.py [--store PATH] [--seeds 3] [--skip-scaling] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stratalign.stages.demo import DemoConfig
from stratalign.stages.run_config import RunConfig
from stratalign.stages.sweep import SweepConfig, run_sweep
from stratalign.stages.train import train_run
from stratalign.store.features import FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.train import RunSpec, TrainConfig, train_many


def _copy(src: str, dst: Path) -> FeatureStore:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs"))
    return FeatureStore.open(str(dst), "a")


def grid(seeds: int) -> SweepConfig:
    d = DemoConfig()
    return SweepConfig(base=RunConfig(dataset=d.dataset, vision=d.vision, text=d.text, options=d.train_options),
                       n_pairs=d.n_pairs, seeds=tuple(range(seeds)), objectives=d.objectives,
                       layer_rules=d.layer_rules, heads=("linear",), skip=d.skip)


def compare(a: FeatureStore, b: FeatureStore, run_ids: list[str]) -> tuple[float, float]:
    """(max abs difference of float metrics, of weights) between the same runs in two stores."""
    ra, rb = RunRegistry(a), RunRegistry(b)
    dm = dw = 0.0
    for rid in run_ids:
        ma, mb = ra.metrics(rid), rb.metrics(rid)
        for k, v in ma.items():
            if isinstance(v, float) and "seconds" not in k and isinstance(mb.get(k), float):
                dm = max(dm, abs(v - mb[k]))
        ta, tb = ra.load(rid)[1], rb.load(rid)[1]
        for k in ta:
            dw = max(dw, float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0)
    return dm, dw


def sweep_part(store: str, seeds: int, tol: float) -> float:
    cfg = grid(seeds)
    cells = cfg.cells()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _copy(store, Path(tmp) / "a"), _copy(store, Path(tmp) / "b")
        t0 = time.perf_counter()
        res = run_sweep(a, cfg, None, progress=False)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        for cell in cells:
            train_run(b, replace(cell))
        t_alone = time.perf_counter() - t0
        dm, dw = compare(a, b, res.run_ids)
    n = len(cells)
    print(f"grid: {n} cells ({seeds} seeds)")
    print(f"{'mode':<12}{'seconds':>10}{'runs/s':>10}")
    print(f"{'one by one':<12}{t_alone:>10.1f}{n / t_alone:>10.2f}")
    print(f"{'batched':<12}{t_batched:>10.1f}{n / t_batched:>10.2f}")
    ok = dm <= tol and dw <= tol
    print(f"same numbers: max |metric diff| {dm:.2e}, max |weight diff| {dw:.2e} -> {'OK' if ok else 'DIFFER'}")
    return t_alone / t_batched


def scaling_part(sizes: tuple[int, ...] = (1, 8, 32, 128), steps: int = 100) -> None:
    rng = np.random.default_rng(0)
    n = 1000 + 200
    xi = rng.standard_normal((n, 384)).astype(np.float32)
    xt = (xi @ rng.standard_normal((384, 384)).astype(np.float32) * 0.05
          + rng.standard_normal((n, 384)).astype(np.float32))
    base = dict(dim=512, batch_size=256, max_steps=steps, patience=10 * steps, eval_every=10, device="cpu")
    print(f"scaling: S runs of 1,000 pairs, clip, {steps} steps, batch 256")
    print(f"{'S':>5}{'seconds':>10}{'s/run':>10}{'vs S=1':>10}")
    per_one = None
    for s in sizes:
        specs = [RunSpec(TrainConfig(seed=i, **base), np.arange(1000), np.arange(1000, n)) for i in range(s)]
        t0 = time.perf_counter()
        train_many([(xi, xt)], specs)
        dt = time.perf_counter() - t0
        per_one = per_one or dt
        print(f"{s:>5}{dt:>10.1f}{dt / s:>10.3f}{per_one / (dt / s):>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="/work/base/store")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_scaling:
        scaling_part()
    ratio = sweep_part(args.store, args.seeds, args.tol)
    print(f"speedup: {ratio:.2f}x")


if __name__ == "__main__":
    main()
