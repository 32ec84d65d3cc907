"""Sweeps batched vs one run at a time: the demo's grid through the whole stage (train, evaluate, save), then
the trainer alone at S = 1, 8, 32, 128 runs of 1,000 pairs.

Part 1, the demo's grid (stages.demo.DemoConfig: clip / clip+structure / clip+ib / csa on the chosen layers and
clip on the last layers, n in {200, 500, all}, 5 seeds, every knob tuned on validation: 390 runs) on a store
that holds the demo's features and layer choices (what `stratalign demo` leaves in stratalign-store/). Two
copies of that store without its runs; in each, in the same process, the grid is trained
  one by one: every cell with `tune_run`, every run trained alone (groups of one run: the S = 1 case; no CSA
              decomposition shared between the fits of a k grid), in fp32, and
  batched:    every cell with one `tune_runs` call (all grid points of all cells through `train_runs`), in
              `--precision` (default auto: bf16 where the hardware has it, the lean step of issue 30).
With one precision, every run of one copy is checked against the other: the same run ids, weights within 1e-5,
the same restored steps, test metrics within 1e-3 (percent); across precisions (other run ids) the mean test
metrics of both are printed. `--seeds 25` is the 5x larger grid (1,950 runs).
Printed: runs, seconds and runs/s of both, where the seconds went (cProfile of both, the top entries), and
the ratio as the last line (`speedup: X.XXx`).

Part 2 (`--scaling`): train_many on synthetic 384-d pairs (1,000 training pairs each, clip+structure, the cpu
preset's schedule with early stopping off, 60 steps), S runs batched vs the same S one by one (S = 1 and 8
one by one; larger S extrapolated from S = 8's per-run time), seconds and runs/s.

    python benchmarks/sweep.py --store stratalign-store            # part 1 (~8 min on 2 cores)
    python benchmarks/sweep.py --store stratalign-store --seeds 25 --no-alone   # the 5x grid, batched only
    python benchmarks/sweep.py --scaling 1,8,32,128 --no-grid       # part 2
    python benchmarks/sweep.py --store stratalign-store --seeds 2 --busy 1   # beside one busy process
    python benchmarks/sweep.py --no-grid --floor 1,8,32             # part 3
    python benchmarks/sweep.py --store small --dataset twemoji-mixed300 --n-pairs 100,all --seeds 2   # demo --limit 300

Part 3 (`--floor`): why batching cannot go far on a CPU. The trainer's seconds per run-step (S clip+structure runs
of 1,000 synthetic 384-d pairs, batch 256, batched) against the bare dense products of one step (heads, their
weight gradients, CLIP logits and gradients, R_S similarities and gradient: ~1 GFLOP a run), batched over the same
S runs with torch.bmm and timed back to back. No loop, batched or not, runs a step in less than its dense
products at fp32, so trainer / products bounds the speedup any batching could bring.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _copy_without_runs(src: str, dst: str) -> None:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if d == src and n in ("runs", "indexes")])


def _cells(store_url: str, seeds: int, precision: str = "fp32", dataset: str = "", n_pairs: str = "") -> list:
    from stratalign.stages.demo import DemoConfig
    from stratalign.stages.runs.config import RunConfig
    from stratalign.stages.runs.sweep import SweepConfig
    from stratalign.store.feature_store import FeatureStore

    demo = DemoConfig()
    dataset = dataset or demo.dataset
    sizes = tuple(None if n == "all" else int(n) for n in n_pairs.split(",")) if n_pairs else demo.n_pairs
    store = FeatureStore.open(store_url, "r")
    if dataset not in store.datasets():
        sys.exit(f"{store_url} has no {dataset!r} dataset: run `stratalign demo` first and pass its store")
    options = tuple(demo.train_options) + ((("precision", precision),) if precision != "fp32" else ())
    base = RunConfig(dataset=dataset, vision=demo.vision, text=demo.text, options=options, preset=demo.preset)
    sweep = SweepConfig(base=base, n_pairs=sizes, seeds=tuple(range(seeds)), objectives=demo.objectives,
                        layer_rules=demo.layer_rules, heads=("linear",), skip=demo.skip, skip_n=demo.skip_n, tune=True)
    return sweep.cells()


def _timed(fn, profile: bool) -> tuple[float, str, object]:
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = fn()
    if prof:
        prof.disable()
    seconds = time.perf_counter() - t0
    text = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"stratalign|torch\.optim|faiss", 14)
        text = "\n".join(line for line in buf.getvalue().splitlines() if "stratalign" in line or "optim" in line
                         or "faiss" in line or "ncalls" in line)
    return seconds, text, out


def _compare(store_a: str, store_b: str) -> tuple[int, float, float]:
    """(runs compared, max |weight difference|, max |test metric difference|) between the two copies."""
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    a, b = RunRegistry(FeatureStore.open(store_a, "r")), RunRegistry(FeatureStore.open(store_b, "r"))
    ids_a, ids_b = set(a.ids()), set(b.ids())
    if ids_a != ids_b:
        sys.exit(f"the two sweeps trained different runs: {len(ids_a ^ ids_b)} differ")
    w_diff, m_diff = 0.0, 0.0
    for rid in sorted(ids_a):
        ta, tb = a.load(rid)[1], b.load(rid)[1]
        for k in ta:
            w_diff = max(w_diff, float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0)
        ma, mb = a.metrics(rid), b.metrics(rid)
        if ma.get("best_step") != mb.get("best_step"):
            sys.exit(f"run {rid}: restored step {ma.get('best_step')} alone vs {mb.get('best_step')} batched")
        for k in ("i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10", "zs_top1", "probe_acc"):
            if isinstance(ma.get(k), float):
                m_diff = max(m_diff, abs(ma[k] - mb[k]))
    return len(ids_a), w_diff, m_diff


def _mean_metrics(store: str) -> str:
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    reg = RunRegistry(FeatureStore.open(store, "r"))
    rows = [reg.metrics(rid) for rid in reg.ids()]
    keys = ("i2t_R@1", "t2i_R@1", "zs_top1")
    return ", ".join(f"{k} {np.mean([r[k] for r in rows if isinstance(r.get(k), float)]):.2f}" for k in keys)


def grid(store: str, seeds: int, alone: bool, profile: bool, workdir: str, precision: str = "fp32", dataset: str = "",
         n_pairs: str = "") -> float | None:
    from stratalign.device import resolve_device, resolve_precision
    from stratalign.stages.runs.tune import tune_run, tune_runs
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry
    from stratalign.train import fit

    precision = resolve_precision(precision, resolve_device("auto"))
    cells = _cells(store, seeds, "fp32", dataset, n_pairs)
    copies = {}
    for mode in ("alone", "batched") if alone else ("batched",):
        copies[mode] = os.path.join(workdir, mode)
        _copy_without_runs(store, copies[mode])
    print(f"demo grid, seeds 0-{seeds - 1}: {len(cells)} tuned cells; one by one in fp32, batched in {precision}",
          flush=True)
    results = {}
    if alone:
        fs = FeatureStore.open(copies["alone"], "a")
        real, bases = fit.train_heads_many, fit._CSA_BASES
        fit.train_heads_many = functools.partial(real, max_group=1)  # every run alone: groups of one
        fit._CSA_BASES = fit._CsaBases(size=0)  # and nothing shared between runs: each CSA fit decomposes alone
        try:
            secs, prof, tuned = _timed(lambda: [tune_run(fs, c) for c in cells], profile)
        finally:
            fit.train_heads_many, fit._CSA_BASES = real, bases
        results["alone"] = (secs, len(RunRegistry(fs).ids()), prof)  # the runs in the copy
    fs = FeatureStore.open(copies["batched"], "a")
    batched_cells = _cells(store, seeds, precision, dataset, n_pairs)
    secs, prof, tuned = _timed(lambda: tune_runs(fs, batched_cells, progress=True), profile)
    results["batched"] = (secs, len(RunRegistry(fs).ids()), prof)  # (TunedRun.tried is per cell)
    print("\n| mode | runs | seconds | runs/s |\n| --- | --- | --- | --- |")
    for mode, (secs, runs, _) in results.items():
        print(f"| {mode} | {runs} | {secs:.1f} | {runs / secs:.2f} |")
    for mode, (_, _, text) in results.items():
        if text:
            print(f"\nwhere the seconds went, {mode} (cumulative s):\n{text}")
    if not alone:
        return None
    if precision != "fp32":
        print(f"\nmean test metrics: one by one (fp32) {_mean_metrics(copies['alone'])}; batched ({precision}) "
              f"{_mean_metrics(copies['batched'])} (paired differences: issue 30 Deliver 7)")
        return results["alone"][0] / results["batched"][0]
    n, w, m = _compare(copies["alone"], copies["batched"])
    print(f"\nsame numbers: {n} runs, max |weight diff| {w:.2e}, max |test metric diff| {m:.2e} (percent points)")
    if w > 1e-5 or m > 1e-3:
        sys.exit("batched and one-by-one runs differ beyond 1e-5 (weights) / 1e-3 (metrics)")
    return results["alone"][0] / results["batched"][0]


def scaling(sizes: list[int], steps: int) -> None:
    from stratalign.train import RunSpec, TrainConfig, train_many

    rng = np.random.default_rng(0)
    n_val = 300
    print("\n| S runs | one by one s | batched s | runs/s one by one | runs/s batched | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    per_run_alone = None
    warm = rng.standard_normal((600, 384), dtype=np.float32)  # first-call costs (imports, allocator) off the clock
    train_many(warm, warm, [RunSpec(TrainConfig(objective="clip+structure", batch_size=256, max_steps=5, warmup_steps=1,
                                                device="cpu"), np.arange(500), np.arange(500, 600))])
    for s in sizes:
        xi = rng.standard_normal((1000 * min(s, 8) + n_val, 384), dtype=np.float32)
        xt = rng.standard_normal((1000 * min(s, 8) + n_val, 384), dtype=np.float32)
        val = np.arange(len(xi) - n_val, len(xi))
        specs = [RunSpec(TrainConfig(objective="clip+structure", batch_size=256, max_steps=steps, warmup_steps=10,
                                     patience=10 * steps, eval_every=10, seed=i, device="cpu"),
                         np.arange(1000 * (i % 8), 1000 * (i % 8 + 1)), val) for i in range(s)]
        if s <= 8:
            t0 = time.perf_counter()
            for spec in specs:
                train_many(xi, xt, [spec])
            alone = time.perf_counter() - t0
            per_run_alone = alone / s
            note = ""
        else:
            alone = per_run_alone * s
            note = " (extrapolated)"
        t0 = time.perf_counter()
        train_many(xi, xt, specs)
        batched = time.perf_counter() - t0
        print(f"| {s} | {alone:.1f}{note} | {batched:.1f} | {s / alone:.2f} | {s / batched:.2f} | {alone / batched:.2f}x |",
              flush=True)


def _step_matmuls(s: int, b: int = 256, d_in: int = 384, d_out: int = 512) -> tuple[list, float]:
    """The dense products of one clip+structure step of S linear-head runs (docs/method.md § 3.1-3.2, L = 1), batched over the
    runs as a stacked trainer would at best: heads forward and weight gradients (2 modalities), CLIP logits and
    their two gradients, R_S's frozen-side and head-side similarities and the head side's gradient; (the
    closures, GFLOP of one run's step)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(s, b, d_in, generator=g) for _ in range(2)]
    w = [torch.randn(s, d_in, d_out, generator=g) for _ in range(2)]
    z = [torch.randn(s, b, d_out, generator=g) for _ in range(2)]
    gz = torch.randn(s, b, b, generator=g)
    ops = [lambda i=i: torch.bmm(x[i], w[i]) for i in range(2)]  # heads forward
    ops += [lambda i=i: torch.bmm(x[i].transpose(1, 2), z[i]) for i in range(2)]  # weight gradients
    ops += [lambda: torch.bmm(z[0], z[1].transpose(1, 2)), lambda: torch.bmm(gz, z[1]),
            lambda: torch.bmm(gz.transpose(1, 2), z[0])]  # CLIP logits, d logits -> dZ_i, dZ_t
    ops += [lambda i=i: torch.bmm(x[i], x[i].transpose(1, 2)) for i in range(2)]  # R_S frozen side
    ops += [lambda i=i: torch.bmm(z[i], z[i].transpose(1, 2)) for i in range(2)]  # R_S head side
    ops += [lambda i=i: torch.bmm(gz, z[i]) for i in range(2)]  # R_S head side, gradient
    flops = 2 * b * (4 * d_in * d_out + 3 * b * d_out + 2 * b * d_in + 4 * b * d_out)
    return ops, flops / 1e9


def floor(sizes: list[int], steps: int) -> float:
    """How much faster a run-step could get at most: the trainer's seconds per run-step (S runs batched through
    train_many, early stopping off) against the bare dense products of one step batched over the same S runs,
    measured back to back; the dense products are a floor that no batching or loop can go under at fp32."""
    from stratalign.train import RunSpec, TrainConfig, train_many

    rng = np.random.default_rng(0)
    print("\n| S runs | trainer ms / run-step | dense products ms / run-step | GFLOP/s of the products | trainer / floor |")
    print("| --- | --- | --- | --- | --- |")
    ceiling = 0.0
    for s in sizes:
        xi = rng.standard_normal((1000 + 300, 384), dtype=np.float32)
        xt = rng.standard_normal((1000 + 300, 384), dtype=np.float32)
        specs = [RunSpec(TrainConfig(objective="clip+structure", batch_size=256, max_steps=steps,
                                     warmup_steps=min(10, steps), patience=10 * steps, eval_every=10 * steps, seed=i,
                                     device="cpu"),
                         np.arange(1000), np.arange(1000, 1300)) for i in range(s)]
        train_many(xi, xt, specs[:1])  # warm-up
        t0 = time.perf_counter()
        train_many(xi, xt, specs)
        trainer = (time.perf_counter() - t0) / (s * steps)
        ops, gflop = _step_matmuls(s)
        for op in ops:  # warm-up
            op()
        t0 = time.perf_counter()
        for _ in range(steps):
            for op in ops:
                op()
        dense = (time.perf_counter() - t0) / (s * steps)
        ceiling = max(ceiling, trainer / dense)
        print(f"| {s} | {trainer * 1e3:.2f} | {dense * 1e3:.2f} | {gflop / dense:.0f} | {trainer / dense:.2f}x |",
              flush=True)
    return ceiling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="stratalign-store", help="a store with the demo's features (stratalign demo)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the grid (5 = the demo, 25 = 5x larger)")
    ap.add_argument("--no-alone", action="store_true", help="batched only (no one-by-one baseline, no ratio)")
    ap.add_argument("--no-grid", action="store_true", help="skip part 1")
    ap.add_argument("--profile", action="store_true", help="cProfile both modes and print where the time went")
    ap.add_argument("--scaling", default="", help="part 2: comma-separated S, e.g. 1,8,32,128")
    ap.add_argument("--steps", type=int, default=60, help="parts 2 and 3: steps per run")
    ap.add_argument("--floor", default="", help="part 3: comma-separated S, e.g. 1,8,32: the trainer against the "
                    "bare dense products of its steps (the most any batching could gain)")
    ap.add_argument("--dataset", default="", help="part 1: the dataset (default: the demo's; `demo --limit N` names "
                    "its own)")
    ap.add_argument("--n-pairs", default="", help="part 1: the grid's training-set sizes, e.g. 100,all (default: the "
                    "demo's 200,500,all)")
    ap.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"),
                    help="part 1: the batched sweep's precision (the one-by-one baseline is fp32)")
    ap.add_argument("--keep", default="", help="keep the two store copies in this folder")
    ap.add_argument("--busy", type=int, default=0,
                    help="processes spinning on a core while both modes run (a shared machine, reproducibly)")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{args.busy} busy process(es) beside", flush=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        ratio = _parts(args)
    finally:
        for p in busy:
            p.kill()
    if ratio is not None:
        print(f"speedup: {ratio:.2f}x")


def _parts(args: argparse.Namespace) -> float | None:
    ratio = None
    if not args.no_grid:
        workdir = args.keep or tempfile.mkdtemp(prefix="sweep-bench-")
        try:
            ratio = grid(args.store, args.seeds, not args.no_alone, args.profile, workdir, args.precision, args.dataset,
                         args.n_pairs)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    if args.scaling:
        scaling([int(s) for s in args.scaling.split(",")], args.steps)
    if args.floor:
        ceiling = floor([int(s) for s in args.floor.split(",")], args.steps)
        print(f"\nat most {ceiling:.2f}x from any faster loop at these shapes (the trainer's run-step over the bare "
              "dense products of one)")
    return ratio


if __name__ == "__main__":
    main()
