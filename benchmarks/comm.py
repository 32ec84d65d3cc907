"""What a CoMM run costs against a linear-head run (issue 30, Deliver 5), variants alternated in one process.

1. Per step, on synthetic features of the demo's size (1,328 training pairs, 204 validation pairs, 384-d each,
   batch 256; the `cpu` preset's schedule without early stopping): a CLIP run of linear heads, CoMM as
   docs/method.md § 3.5 reads (one model call per view and mask: tests/comm_reference.py) and CoMM batched
   (stratalign.core.comm: both views in one pass, only the CLS row, 6 groups in one projection), each through
   its trainer (train_heads / train_comm) for --steps steps; CoMM at every --comm-dims. ms per step and the ratios.
2. With --store: whole runs as a sweep trains them (stages.runs.train_run: train, evaluate, save; early stopping
   as configured), CLIP with linear heads against CoMM on the same pairs, layers, preset and precision; seconds
   a run, steps taken, and the last line `comm run / linear run: X.XXx`.
3. Always: the FLOPs of one training step (torch.utils.flop_counter, forward + backward at batch 256, 384-d
   features): a CLIP step of two linear heads (384 -> TrainConfig.dim) against a CoMM step at every --comm-dims;
   with --store also per run (x the steps each took). What a whole-run ratio can reach at best.

Caveat (2026-12-06): part 1's trainer rows swing 3-10x between runs on this machine even at low load (a fresh
process pays ~2 s a step for its first CoMM steps at d = 512: kernel and allocator warm-up, and alternating widths
seems to pay it again); a bare step in a warm process (fwd+bwd, no optimiser) measured d = 512 per view 674 ms,
batched 236 ms; d = 256 batched 89 ms; CLIP's trainer 10 ms a step (2 threads, load 2-3). Trust part 2's whole runs.
Caveat 2 (2026-12-06, later): part 2's ratio is only meaningful at low load. The linear run is small kernels that a
loaded machine slows far more than CoMM's large products: linear run 0.78 s at load 0.1-1.5 but 25-47 s at load
6-7, which read 8-12x where the quiet machine reads 47x (fp32; CoMM 37 s). Report `uptime` with every ratio.

Run: python benchmarks/comm.py [--steps 40] [--repeats 3] [--precision fp32] [--comm-dims 512,128]
     [--store DIR --dataset twemoji --vision dinov2-s --text minilm-l6 --layers last --run-repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the per-view reference

from comm_reference import step_loss_per_view  # noqa: E402

from stratalign.train import TrainConfig, train_comm, train_heads  # noqa: E402
from stratalign.train.presets import apply_preset, choose_preset  # noqa: E402

N_TRAIN, N_VAL, D = 1328, 204, 384


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired rows sharing a 32-d signal, as cached features are (not pure noise)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL
    z = rng.standard_normal((n, 32)).astype(np.float32)
    return tuple((z @ rng.standard_normal((32, D)) + 0.5 * rng.standard_normal((n, D))).astype(np.float32)
                 for _ in range(2))  # type: ignore[return-value]


def step_variants(steps: int, precision: str, dims: list[int]) -> dict[str, callable]:
    xi, xt = synthetic()
    tr, va = np.arange(N_TRAIN), np.arange(N_TRAIN, N_TRAIN + N_VAL)
    kw = {**apply_preset(choose_preset("cpu"), {}), "max_steps": steps, "patience": 10 * steps,
          "eval_every": steps, "device": "cpu", "precision": precision}

    def linear() -> float:
        t = time.perf_counter()
        train_heads(xi, xt, tr, va, TrainConfig(objective="clip", **kw))
        return time.perf_counter() - t

    def comm(dim: int, per_view: bool):
        def run() -> float:
            t = time.perf_counter()
            if per_view:
                with mock.patch("stratalign.train.fit.comm_step_loss", step_loss_per_view):
                    train_comm(xi, xt, tr, va, TrainConfig(objective="comm", comm_dim=dim, **kw))
            else:
                train_comm(xi, xt, tr, va, TrainConfig(objective="comm", comm_dim=dim, **kw))
            return time.perf_counter() - t
        return run

    out = {"linear (clip)": linear}
    for dim in dims:
        out[f"comm d={dim} per view"] = comm(dim, True)
        out[f"comm d={dim} batched"] = comm(dim, False)
    return out


def alternate(variants: dict[str, callable], repeats: int) -> dict[str, float]:
    """Least seconds of each variant over `repeats` rounds, the variants alternating in each round (the least: on a
    shared 2-core machine a round can stall for seconds, which is the machine's load, not the variant's cost)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    return {k: min(v) for k, v in times.items()}


def whole_runs(args: argparse.Namespace) -> None:
    from stratalign.stages.runs.config import RunConfig
    from stratalign.stages.runs.training import train_run
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(args.store, "a")
    opts = (("precision", args.precision),)
    steps: dict[str, list[tuple]] = {}  # (steps taken, restored step, probe acc, frozen concat probe acc) a run

    def run(objective: str, dim: int | None):
        options = opts + ((("comm_dim", dim),) if dim else ())
        cfg = RunConfig(dataset=args.dataset, vision=args.vision, text=args.text, layers=args.layers,
                        objective=objective, preset="cpu", options=options)

        def go() -> float:
            t = time.perf_counter()
            res = train_run(store, cfg, force=True)
            m = res.metrics
            steps.setdefault(label, []).append((m.get("steps_taken"), m.get("best_step"), m.get("probe_acc"),
                                                (m.get("probe_baselines") or {}).get("concat", {}).get("acc")))
            return time.perf_counter() - t
        label = objective if dim is None else f"comm d={dim}"
        return label, go

    variants = dict([run("clip", None), *(run("comm", d) for d in args.comm_dims)])
    variants["clip"]()  # warm: imports, the store's caches, kernels
    steps.clear()
    secs = alternate(variants, args.run_repeats)
    base = secs["clip"]
    for name, s in secs.items():
        print(f"run {name:>10}: {s:7.2f} s, {s / base:6.2f}x the linear run; (steps taken, restored step, probe %, "
              f"frozen probe %) a run: {steps[name]}")
    flops = step_flops(args.comm_dims)
    lin = flops["linear (clip)"] * steps["clip"][0][0]
    for d in args.comm_dims:
        run_gf = flops[f"comm d={d}"] * steps[f"comm d={d}"][0][0]
        print(f"GFLOP a run comm d={d}: {run_gf:.0f} vs linear {lin:.0f} ({run_gf / lin:.0f}x; steps taken x a step)")
    for d in args.comm_dims:
        print(f"comm run / linear run: {secs[f'comm d={d}'] / base:.2f}x (comm_dim {d}, {args.precision})")


def step_flops(dims: list[int]) -> dict[str, float]:
    """GFLOP of one training step (forward + backward, batch 256, D-d features): CLIP on two linear heads of
    TrainConfig.dim, and CoMM's step (comm_step_loss) at each width."""
    from torch.utils.flop_counter import FlopCounterMode

    from stratalign.core.comm import CommModel, comm_step_loss
    from stratalign.core.losses import clip_loss

    torch.manual_seed(0)
    x, y = torch.randn(256, D), torch.randn(256, D)
    out = {}
    heads = torch.nn.Linear(D, TrainConfig().dim), torch.nn.Linear(D, TrainConfig().dim)
    with FlopCounterMode(display=False) as fc:
        clip_loss(heads[0](x), heads[1](y), 0.07).backward()
    out["linear (clip)"] = fc.get_total_flops() / 1e9
    for dim in dims:
        model = CommModel(D, D, dim=dim)
        with FlopCounterMode(display=False) as fc:
            comm_step_loss(model, x, y, x.std(0, keepdim=True), y.std(0, keepdim=True)).backward()
        out[f"comm d={dim}"] = fc.get_total_flops() / 1e9
    for name, g in out.items():
        print(f"GFLOP a step {name:>14}: {g:7.2f}  ({g / out['linear (clip)']:5.1f}x the linear step)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--comm-dims", type=lambda s: [int(x) for x in s.split(",")], default=[512, 128])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--store", default=None)
    ap.add_argument("--dataset", default="twemoji")
    ap.add_argument("--vision", default="dinov2-s")
    ap.add_argument("--text", default="minilm-l6")
    ap.add_argument("--layers", default="last")
    ap.add_argument("--run-repeats", type=int, default=2)
    ap.add_argument("--skip-steps", action="store_true", help="only the whole runs (--store)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, precision {args.precision}")
    if not args.skip_steps:
        variants = step_variants(args.steps, args.precision, args.comm_dims)
        for fn in variants.values():
            fn()  # warm
        secs = alternate(variants, args.repeats)
        base = secs["linear (clip)"]
        for name, s in secs.items():
            print(f"{name:>22}: {1000 * s / args.steps:8.1f} ms/step  {s / base:6.2f}x linear")
        for d in args.comm_dims:
            print(f"comm d={d}: batched / per view {secs[f'comm d={d} batched'] / secs[f'comm d={d} per view']:.2f}x")
    if args.store:
        whole_runs(args)
    else:
        step_flops(args.comm_dims)


if __name__ == "__main__":
    main()
