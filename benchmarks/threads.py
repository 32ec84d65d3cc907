"""The CPU thread policy, measured quiet and under load (issue 30: "a loaded machine does not stall").

Case `step` (torch's OpenMP threads): one training-like step (heads 384 -> 512 on a batch of 256, a 256 x 256
similarity, log-softmax, backward: the trainer's shapes) timed per step in a fresh process per variant, so that the
OpenMP settings take effect:
  1 thread | all threads, OpenMP's default wait policy (threads spin) | all threads, OMP_WAIT_POLICY=PASSIVE
  (what `import stratalign` sets unless the user chose) | all threads, GOMP_SPINCOUNT=10000 (spin briefly).
Variants alternate over --rounds; `--busy N` starts N busy processes (pure Python loops) for the whole run, the
loaded case. Printed per variant: min, median, p95 and max ms a step (pooled over rounds), and the ratio of each
variant's median to the 1-thread median.

Case `blas` (numpy's OpenBLAS pthreads, which OMP_WAIT_POLICY does not reach): a fit_csa-sized float64 workload
(covariances of 1328 x 384 pairs, two eigh-based inverse square roots, the SVD of the 384 x 384 whitened
cross-covariance) right after 5 of the training-like steps above, alternated as the trainer alternates CSA fits and
heads' steps; torch threads passive in every variant (as `import stratalign` sets). OpenBLAS's idle workers
busy-wait (sched_yield loop) for 2^OPENBLAS_THREAD_TIMEOUT TSC cycles (default 2^28, ~0.1 s) after each call,
read once when the library loads. Variants: OpenBLAS default | OPENBLAS_THREAD_TIMEOUT=4 (the minimum: sleep at
once) | OPENBLAS_THREAD_TIMEOUT=20 (~0.4 ms) | OPENBLAS_NUM_THREADS=1 | threadpoolctl limiting BLAS to 1 thread
around each fit only. Printed: the fit's, the 5 steps' and their sum's min, median, p95 and max ms, and each median / the
default's. (The stall is not the idle spin but the wait inside each of the fit's many small calls for a worker the
loaded CPU has descheduled: a short timeout does not remove it, 1 thread does; `import stratalign` sets 1.)

    python benchmarks/threads.py                 # the machine as it is
    python benchmarks/threads.py --busy 2        # beside two busy processes
    python benchmarks/threads.py --case blas     # only the numpy-BLAS case
"""

from __future__ import annotations

import argparse
import importlib.util
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

BLAS = r"""
import contextlib, json, sys, time
import numpy as np, torch
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 384, generator=g)
w = torch.randn(384, 512, generator=g, requires_grad=True)
rng = np.random.default_rng(0)
a32 = rng.normal(size=(1328, 384)).astype(np.float32)
b32 = (a32 @ rng.normal(size=(384, 384)).astype(np.float32) + rng.normal(size=(1328, 384))).astype(np.float32)

def step():
    z = x @ w
    loss = -torch.log_softmax(z @ z.T / 0.05, 1).diagonal().mean()
    loss.backward()

# imported after numpy: OpenBLAS has read its thread count by now, so stratalign's own setting (OPENBLAS_NUM_THREADS=1 at
# import) does not reach this process and each variant's environment is what it runs under
from stratalign.core.heads import csa_basis

def fit():  # CSA's float64 algebra as the trainer runs it: the decomposition, then the top-64 maps
    basis = csa_basis(a32, b32, 0.1)
    return basis.inv_a @ basis.u[:, :64], basis.inv_b @ basis.vt[:64].T

limit = sys.argv[3] == "1"
if limit:
    import threadpoolctl
fits, steps = [], []
for i in range(int(sys.argv[2]) + 2):
    t = time.perf_counter()
    for _ in range(5):
        step()
    steps.append(time.perf_counter() - t)
    t = time.perf_counter()
    with threadpoolctl.threadpool_limits(1, "blas") if limit else contextlib.nullcontext():
        fit()
    fits.append(time.perf_counter() - t)
print(json.dumps({"fit": fits[2:], "5 steps": steps[2:]}))
"""

VARIANTS = {"1 thread": (1, {}), "all, spin (OpenMP default)": (0, {"OMP_WAIT_POLICY": None}),
            "all, passive (stratalign)": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
            "all, GOMP_SPINCOUNT=10000": (0, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"})}

# name -> (threadpoolctl limit around each fit, env); "" leaves OpenBLAS at its compiled default (atoi("") = 0)
_NO_BLAS_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "", "OPENBLAS_NUM_THREADS": None,
                "OMP_NUM_THREADS": None, "GOTO_NUM_THREADS": None}
BLAS_VARIANTS = {"OpenBLAS default": (False, _NO_BLAS_ENV),
                 "OPENBLAS_THREAD_TIMEOUT=4": (False, {**_NO_BLAS_ENV, "OPENBLAS_THREAD_TIMEOUT": "4"}),
                 "OPENBLAS_THREAD_TIMEOUT=20": (False, {**_NO_BLAS_ENV, "OPENBLAS_THREAD_TIMEOUT": "20"}),
                 "OPENBLAS_NUM_THREADS=1": (False, {**_NO_BLAS_ENV, "OPENBLAS_NUM_THREADS": "1"}),
                 "threadpoolctl 1 around fits": (True, _NO_BLAS_ENV)}
if importlib.util.find_spec("threadpoolctl") is None:  # not a dependency of stratalign
    del BLAS_VARIANTS["threadpoolctl 1 around fits"]


def _busy() -> None:
    while True:
        pass


def _env(env: dict[str, str | None]) -> dict[str, str]:
    full = dict(os.environ)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return full


def run_variant(threads: int, env: dict[str, str | None], steps: int) -> list[float]:
    n = threads or os.cpu_count() or 1
    out = subprocess.run([sys.executable, "-c", STEP, str(n), str(steps)], env=_env(env), capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def run_blas_variant(limit: bool, env: dict[str, str | None], fits: int) -> dict[str, list[float]]:
    out = subprocess.run([sys.executable, "-c", BLAS, "0", str(fits), "1" if limit else "0"], env=_env(env),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _line(name: str, ts: list[float], base: float) -> str:
    ms = np.asarray(ts) * 1000
    return (f"{name:28s} min {ms.min():7.2f}  median {np.median(ms):7.2f} ms  p95 {np.percentile(ms, 95):7.2f}  "
            f"max {ms.max():8.1f}  median / base {np.median(ms) / (base * 1000):.2f}x")


def step_case(rounds: int, steps: int) -> None:
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        for name, (threads, env) in VARIANTS.items():
            times[name] += run_variant(threads, env, steps)
    print(f"case step ({rounds} rounds x {steps} steps; base: 1 thread), load average {os.getloadavg()[0]:.1f}")
    base = float(np.median(times["1 thread"]))
    for name, ts in times.items():
        print(_line(name, ts, base))


def blas_case(rounds: int, fits: int) -> None:
    times: dict[str, dict[str, list[float]]] = {k: {"fit": [], "5 steps": [], "fit + next 5 steps": []}
                                               for k in BLAS_VARIANTS}
    for _ in range(rounds):
        for name, (limit, env) in BLAS_VARIANTS.items():
            out = run_blas_variant(limit, env, fits)
            for part, ts in out.items():
                times[name][part] += ts
            # a fit and the 5 steps after it (that a spinning worker slows): the trainer's alternation
            times[name]["fit + next 5 steps"] += [f + s for f, s in zip(out["fit"][:-1], out["5 steps"][1:])]
    print(f"case blas ({rounds} rounds x {fits} fits, each after 5 steps; base: OpenBLAS default), "
          f"load average {os.getloadavg()[0]:.1f}")
    for part in ("fit", "5 steps", "fit + next 5 steps"):
        base = float(np.median(times["OpenBLAS default"][part]))
        print(f"-- {part}")
        for name in BLAS_VARIANTS:
            print(_line(name, times[name][part], base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=0, help="busy processes beside the measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--fits", type=int, default=20, help="fits per process in the blas case")
    ap.add_argument("--case", choices=("step", "blas", "all"), default="all")
    args = ap.parse_args()
    busy = [mp.Process(target=_busy, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    print(f"cpus {os.cpu_count()}, busy processes {args.busy}, load average at start {os.getloadavg()[0]:.1f}")
    try:
        if args.case in ("step", "all"):
            step_case(args.rounds, args.steps)
        if args.case in ("blas", "all"):
            blas_case(args.rounds, args.fits)
    finally:
        for p in busy:
            p.terminate()


if __name__ == "__main__":
    main()
