"""Sweeps batched vs one run at a time: the demo's grid through the whole stage (train, evaluate, save), then
the trainer alone at S = 1, 8, 32, 128 runs of 1,000 pairs.

Part 1, the demo's grid (stages.demo.DemoConfig: clip / clip+structure / clip+ib / csa on the chosen layers and
clip on the last layers, n in {200, 500, all}, 5 seeds, every knob tuned on validation: 390 runs) on a store
that holds the demo's features and layer choices (what `stratalign demo` leaves in stratalign-store/). Two
copies of that store without its runs; in each, in the same process, the grid is trained
  one by one: every cell's grid points with `tune_run`, one `train_run` each (the S = 1 case), and
  batched:    every cell with one `tune_runs` call (all grid points of all cells through `train_runs`).
Then every run of one copy is checked against the other: the same run ids, weights within 1e-5, the same
restored steps, test metrics within 1e-3 (percent). `--seeds 25` is the 5x larger grid (1,950 runs).
Printed: runs, seconds and runs/s of both, where the seconds went (cProfile of both, the top entries), and
the ratio as the last line (`speedup: X.XXx`).

Part 2 (`--scaling`): train_many on synthetic 384-d pairs (1,000 training pairs each, clip+structure, the cpu
preset's schedule with early stopping off, 60 steps), S runs batched vs the same S one by one (S = 1 and 8
one by one; larger S extrapolated from S = 8's per-run time), seconds and runs/s.

    python benchmarks/sweep.py --store stratalign-store            # part 1 (~8 min on 2 cores)
    python benchmarks/sweep.py --store stratalign-store --seeds 25 --no-alone   # the 5x grid, batched only
    python benchmarks/sweep.py --scaling 1,8,32,128 --no-grid       # part 2
    python benchmarks/sweep.py --store stratalign-store --seeds 2 --busy 1   # beside one busy process
"""

from __future__ import annotations

import argparse
import cProfile
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


def _cells(store_url: str, seeds: int) -> list:
    from stratalign.stages.demo import DemoConfig
    from stratalign.stages.run_config import RunConfig
    from stratalign.stages.sweep import SweepConfig
    from stratalign.store.features import FeatureStore

    demo = DemoConfig()
    store = FeatureStore.open(store_url, "r")
    if demo.dataset not in store.datasets():
        sys.exit(f"{store_url} has no {demo.dataset!r} dataset: run `stratalign demo` first and pass its store")
    base = RunConfig(dataset=demo.dataset, vision=demo.vision, text=demo.text, options=demo.train_options,
                     preset=demo.preset)
    sweep = SweepConfig(base=base, n_pairs=demo.n_pairs, seeds=tuple(range(seeds)), objectives=demo.objectives,
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
    from stratalign.store.features import FeatureStore
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


def grid(store: str, seeds: int, alone: bool, profile: bool, workdir: str) -> float | None:
    from stratalign.stages.tune import tune_run, tune_runs
    from stratalign.store.features import FeatureStore

    cells = _cells(store, seeds)
    copies = {}
    for mode in ("alone", "batched") if alone else ("batched",):
        copies[mode] = os.path.join(workdir, mode)
        _copy_without_runs(store, copies[mode])
    print(f"demo grid, seeds 0-{seeds - 1}: {len(cells)} tuned cells", flush=True)
    results = {}
    if alone:
        fs = FeatureStore.open(copies["alone"], "a")
        secs, prof, tuned = _timed(lambda: [tune_run(fs, c) for c in cells], profile)
        results["alone"] = (secs, sum(t.tried for t in tuned), prof)
    fs = FeatureStore.open(copies["batched"], "a")
    secs, prof, tuned = _timed(lambda: tune_runs(fs, cells, progress=True), profile)
    results["batched"] = (secs, sum(t.tried for t in tuned), prof)
    print("\n| mode | runs | seconds | runs/s |\n| --- | --- | --- | --- |")
    for mode, (secs, runs, _) in results.items():
        print(f"| {mode} | {runs} | {secs:.1f} | {runs / secs:.2f} |")
    for mode, (_, _, text) in results.items():
        if text:
            print(f"\nwhere the seconds went, {mode} (cumulative s):\n{text}")
    if not alone:
        return None
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="stratalign-store", help="a store with the demo's features (stratalign demo)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the grid (5 = the demo, 25 = 5x larger)")
    ap.add_argument("--no-alone", action="store_true", help="batched only (no one-by-one baseline, no ratio)")
    ap.add_argument("--no-grid", action="store_true", help="skip part 1")
    ap.add_argument("--profile", action="store_true", help="cProfile both modes and print where the time went")
    ap.add_argument("--scaling", default="", help="part 2: comma-separated S, e.g. 1,8,32,128")
    ap.add_argument("--steps", type=int, default=60, help="part 2: steps per run")
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
            ratio = grid(args.store, args.seeds, not args.no_alone, args.profile, workdir)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    if args.scaling:
        scaling([int(s) for s in args.scaling.split(",")], args.steps)
    return ratio


if __name__ == "__main__":
    main()
