"""The CPU thread policy, measured quiet and under load (issue 30: "a loaded machine does not stall").

One training-like step (heads 384 -> 512 on a batch of 256, a 256 x 256 similarity, log-softmax, backward: the
trainer's shapes) timed per step in a fresh process per variant, so that the OpenMP settings take effect:
  1 thread | all threads, OpenMP's default wait policy (threads spin) | all threads, OMP_WAIT_POLICY=PASSIVE
  (what `import stratalign` sets unless the user chose) | all threads, GOMP_SPINCOUNT=10000 (spin briefly).
Variants alternate over --rounds; `--busy N` starts N busy processes (pure Python loops) for the whole run, the
loaded case. Printed per variant: median, p95 and max ms a step (pooled over rounds), and the ratio of each
variant's median to the 1-thread median.

    python benchmarks/threads.py                 # the machine as it is
    python benchmarks/threads.py --busy 2        # beside two busy processes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np

STEP = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 384, generator=g)
w = torch.randn(384, 512, generator=g, requires_grad=True)
out = []
for i in range(int(sys.argv[2]) + 5):
    t = time.perf_counter()
    z = x @ w
    s = z @ z.T / 0.05
    loss = -torch.log_softmax(s, 1).diagonal().mean()
    loss.backward()
    out.append(time.perf_counter() - t)
print(json.dumps(out[5:]))
"""

VARIANTS = {"1 thread": (1, {}), "all, spin (OpenMP default)": (0, {"OMP_WAIT_POLICY": None}),
            "all, passive (stratalign)": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
            "all, GOMP_SPINCOUNT=10000": (0, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"})}


def _busy() -> None:
    while True:
        pass


def run_variant(threads: int, env: dict[str, str | None], steps: int) -> list[float]:
    full = dict(os.environ)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    n = threads or os.cpu_count() or 1
    out = subprocess.run([sys.executable, "-c", STEP, str(n), str(steps)], env=full, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=0, help="busy processes beside the measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    busy = [mp.Process(target=_busy, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for _ in range(args.rounds):
            for name, (threads, env) in VARIANTS.items():
                times[name] += run_variant(threads, env, args.steps)
    finally:
        for p in busy:
            p.terminate()
    base = float(np.median(times["1 thread"]))
    print(f"cpus {os.cpu_count()}, busy processes {args.busy}, load average {os.getloadavg()[0]:.1f}, "
          f"{args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        ms = np.asarray(ts) * 1000
        print(f"{name:30s} median {np.median(ms):7.2f} ms  p95 {np.percentile(ms, 95):7.2f}  max {ms.max():8.1f}  "
              f"median / 1 thread {np.median(ms) / (base * 1000):.2f}x")


if __name__ == "__main__":
    main()
