"""Reads at COCO scale: r random rows of one layer, entry layout 2 (sharded, 4-row inner chunks) against layout 1
(one chunk per shard: what every store held before) and a NumPy memmap of the same array, in the same run.

A synthetic store on local disk: a caption entry of `--rows` rows (default 590,000, COCO's captions) and an image
entry of rows/5 (COCO's images), `--layers` layers of `--dim` float16 each, written shard by shard through
`FeatureEntry.write_shard` in both layouts with the same values, plus one `.npy` per layer (the memmap).
For r in `--r` (default 1k, 5k, 50k) random rows and the whole layer, each method reads the same rows (a new
random draw each repeat, in random order, as a training subset is gathered) in its own child process, so that
peak RSS is the method's own. Reported: median seconds over `--repeats`, bytes read (the process's read() bytes
from /proc/self/io for the store; for the memmap the 4 KB pages the rows sit in), the child's peak RSS, and the
ratios layout-1/layout-2 (goal >= 20x at 5,000 rows) and layout-2/memmap (goal <= 10x). Then `layers`' read:
every layer of both entries at n sampled pairs (n = 1k, 5k, 20k), to show it grows with n, not with the layer.
Then the stages through the library, each in a child process of its own (benchmarks/store_scale_stages.py: the
entries belong to a real dataset record with a Karpathy-like split): `layers` (every layer pair, mutual kNN) at
`--stage-n` sampled pairs on layout 2 and at 5,000 on layout 1, and one `train` run (clip, linear heads, cpu
preset, `--train-pairs` or every train pair, evaluated on the test split) per layout: wall seconds, the stage's
own read seconds, peak RSS (VmHWM). `--only reads|stages` runs one half (with `--dir --keep`, on a built store).
The page cache is warm (each child reads its method's files once before timing): this measures decoding and
checking, not the disk; on object stores layout 1's whole-layer download is the larger cost. The peak RSS of
the row reads is taken before the whole-layer reads (memmap's counts the mapped file pages it touched).
Layout 2's reads check each chunk against the crc32c its shard's marker names (issue 29: a shard file copied over
another is refused); `layout2-unverified` is the read without that check (the reads before it), and the two are
run in alternation `--rounds` times for the ratio verified / unverified (goal <= 1.5x at 5,000 rows).

    python benchmarks/store_scale.py --rows 200000          # what fits a small machine in a few minutes
    python benchmarks/store_scale.py                        # COCO scale: ~14 GB of files under --dir
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak_rss import peak_rss_mb
from store_scale_stages import (
    DATASET,
    build_dataset_record,
    content_fingerprint,
    encoder_name,
    n_images,
    stage_child,
    stage_table,
)

# layout 2 read as before issue 29: each chunk checked against its own crc32c only, not against the crc32c its shard's
# marker names (`read_layer(verify=False)`); "layout2" is the verified read every stage does
UNVERIFIED = "layout2-unverified"


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _spec(rows: int, layers: int, dim: int, shard_rows: int, modality: str, layout: int, content: str):
    from stratalign.store.feature_store import EntrySpec

    return EntrySpec(dataset=DATASET, content_fingerprint=content, modality=modality,
                     encoder={"spec": encoder_name(modality, layout), "default_pooling": "mean"}, pooling="mean",
                     layer_names=tuple(f"l{i}" for i in range(layers)), dims=(dim,) * layers, rows=rows,
                     shard_rows=shard_rows, format_version=layout)


def build(root: Path, rows: int, layers: int, dim: int, shard_rows: int) -> dict:
    """The dataset record, both entries in both layouts plus the memmaps; returns write seconds per layout."""
    from stratalign.store.feature_store import FeatureStore

    timings: dict = {"dataset_record_s": round(build_dataset_record(root, rows), 1)}
    content = content_fingerprint(root)
    store = FeatureStore.open(str(root / "store"), "a")
    for modality, n in (("text", rows), ("image", n_images(rows))):
        entries = {layout: store.create_entry(_spec(n, layers, dim, shard_rows, modality, layout, content))
                   for layout in (1, 2)}
        maps = [np.lib.format.open_memmap(root / f"{modality}_{i}.npy", mode="w+", dtype=np.float16, shape=(n, dim))
                for i in range(layers)]
        t_write = {1: 0.0, 2: 0.0}
        for s in range(entries[1].spec.n_shards):
            a, b = entries[1].shard_rows_range(s)
            rng = np.random.default_rng(s)
            blocks = [rng.standard_normal((b - a, dim), dtype=np.float32) for _ in range(layers)]
            for layout, entry in entries.items():
                t0 = time.perf_counter()
                entry.write_shard(s, blocks)
                t_write[layout] += time.perf_counter() - t0
            for m, blk in zip(maps, blocks):
                m[a:b] = blk
            if s % 50 == 0:
                print(f"  {modality}: shard {s + 1}/{entries[1].spec.n_shards}", file=sys.stderr, flush=True)
        for m in maps:
            m.flush()
        timings[modality] = {f"layout{k}_write_s": round(v, 2) for k, v in t_write.items()}
    return timings


def child(args: argparse.Namespace) -> dict:
    """One method's reads, in a process of its own (its peak RSS is the method's)."""
    from stratalign.store.feature_store import FeatureStore

    root = Path(args.dir)
    store = FeatureStore.open(str(root / "store"), "r")
    content = store.dataset(DATASET).content_fingerprint

    def reader(modality: str, rows_total: int):
        if args.method == "memmap":
            maps = [np.load(root / f"{modality}_{i}.npy", mmap_mode="r") for i in range(args.layers)]
            return lambda layer, rows: np.array(maps[layer] if rows is None else maps[layer][rows])
        layout = 2 if args.method == UNVERIFIED else int(args.method[-1])
        entry = store.entry(_spec(rows_total, args.layers, args.dim, args.shard_rows, modality, layout, content).key)
        return functools.partial(entry.read_layer, verify=args.method != UNVERIFIED)

    n_img = max(1, args.rows // 5)
    text, image = reader("text", args.rows), reader("image", n_img)
    text(0, np.arange(10))  # open files and metadata once
    _warm(root, store, args)
    out: dict = {"reads": {}, "layers": {}}
    rng = np.random.default_rng(0)
    for r in [*args.r, "all"]:
        if r == "all":  # the row reads' own peak, before a whole layer is held
            out["peak_rss_rows_mb"] = peak_rss_mb()
        times, nbytes = [], []
        for rep in range(args.repeats + 1):  # the first is a warm-up
            rows = None if r == "all" else rng.choice(args.rows, size=min(int(r), args.rows), replace=False)
            layer = rep % args.layers
            io0, t0 = _read_bytes(), time.perf_counter()
            got = text(layer, rows)
            dt, dio = time.perf_counter() - t0, _read_bytes() - io0
            if args.method == "memmap":  # page faults, not read(): the 4 KB pages holding the rows
                row_bytes = args.dim * 2
                idx = np.arange(args.rows) if rows is None else rows
                first, last = (128 + idx * row_bytes) // 4096, (128 + (idx + 1) * row_bytes - 1) // 4096
                dio = 4096 * len(np.union1d(first, last))
            assert got.shape == (args.rows if rows is None else len(rows), args.dim)
            if rep:
                times.append(dt)
                nbytes.append(dio)
        out["reads"][str(r)] = {"s": statistics.median(times), "bytes": statistics.median(nbytes)}
    for n in args.layers_n:
        cap = rng.choice(args.rows, size=min(n, args.rows), replace=False)
        img = cap // 5 % n_img
        t0 = time.perf_counter()
        for layer in range(args.layers):
            text(layer, cap)
            image(layer, img)
        out["layers"][str(n)] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _warm(root: Path, store, args: argparse.Namespace) -> None:
    """Read the method's files once, so that every method is timed with a warm page cache (as the memmap would
    be on a second touch): the table measures decoding and checking, not this machine's disk."""
    if args.method == "memmap":
        files = sorted(root.glob("*.npy"))
    else:
        layout = 2 if args.method == UNVERIFIED else int(args.method[-1])
        content = store.dataset(DATASET).content_fingerprint
        keys = [_spec(n, args.layers, args.dim, args.shard_rows, m, layout, content).key
                for m, n in (("text", args.rows), ("image", n_images(args.rows)))]
        files = [f for k in keys for f in sorted((root / "store" / "features" / k).glob("layer_*/c/*/*"))]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=590_000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=1024)
    p.add_argument("--r", type=int, nargs="+", default=[1000, 5000, 50000])
    p.add_argument("--layers-n", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the synthetic store goes (default: a temp folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic store (and reuse one already in --dir)")
    p.add_argument("--stage-n", type=int, nargs="+", default=[1000, 5000, 20000],
                   help="n of the `layers` stage runs on layout 2 (n = 5,000 also on layout 1)")
    p.add_argument("--train-pairs", type=int, default=None, help="the train run's --n-pairs (default: every train pair)")
    p.add_argument("--only", choices=("all", "reads", "stages"), default="all")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the verified and unverified layout-2 reads")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="memmap", help=argparse.SUPPRESS)
    p.add_argument("--layout", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=5000, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(stage_child(args) if args.method in ("layers", "train") else child(args)))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="store_scale-"))
    built = None
    if not (root / "store").exists():
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        built = build(root, args.rows, args.layers, args.dim, args.shard_rows)
        print(f"built {root} in {time.perf_counter() - t0:.0f} s: {json.dumps(built)}", file=sys.stderr)
    try:
        if args.only in ("all", "reads"):
            results = {method: _run_child(args, root, method) for method in ("memmap", "layout1")}
            results.update(_alternated(args, root, ("layout2", UNVERIFIED)))
            _table(args, results, built)
        if args.only in ("all", "stages"):
            runs = [("layers", 2, n) for n in args.stage_n] + [("layers", 1, 5000), ("train", 2, 0), ("train", 1, 0)]
            stage_table(args, {run: _run_child(args, root, run[0], layout=run[1], n=run[2]) for run in runs})
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _alternated(args: argparse.Namespace, root: Path, methods: tuple[str, ...]) -> dict:
    """Methods whose ratio is a goal, run in alternation `--rounds` times (each in a child of its own); per method,
    the median over rounds of each timing (and of its bytes)."""
    rounds: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            rounds[m].append(_run_child(args, root, m))
    out = {}
    for m, runs in rounds.items():
        first = runs[0]
        out[m] = {**first, "reads": {r: {k: statistics.median(run["reads"][r][k] for run in runs) for k in ("s", "bytes")}
                                     for r in first["reads"]},
                  "layers": {n: statistics.median(run["layers"][n] for run in runs) for n in first["layers"]},
                  "rounds": [run["reads"] for run in runs]}
    return out


def _run_child(args: argparse.Namespace, root: Path, method: str, **extra: int) -> dict:
    """One method's reads (or one stage run) in a child process; its JSON answer."""
    passed = {k: v for k, v in vars(args).items()
              if k in ("rows", "layers", "dim", "shard_rows", "r", "layers_n", "repeats", "train_pairs") and v is not None}
    cmd = [sys.executable, __file__, "--child", "--method", method, "--dir", str(root), *sum(
        ([f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])] for k, v in {**passed, **extra}.items()),
        [])]
    print(f"running: {method} {extra or ''}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{method} {extra} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(args: argparse.Namespace, res: dict, built: dict | None) -> None:
    print(f"\n{args.rows:,} rows x {args.layers} layers x {args.dim}-d float16 ({args.rows * args.dim * 2 / 2**20:.0f} MB a "
          f"layer), shards of {args.shard_rows} rows, median of {args.repeats}; machine: {os.cpu_count()} CPUs\n")
    print("| rows read | memmap s | layout 1 s | layout 2 s | layout 1 / layout 2 | layout 2 / memmap | bytes read: memmap "
          "| layout 1 | layout 2 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["memmap"]["reads"]:
        m, a, b = (res[k]["reads"][r] for k in ("memmap", "layout1", "layout2"))
        print(f"| {r} | {m['s']:.4f} | {a['s']:.3f} | {b['s']:.4f} | {a['s'] / b['s']:.1f}x | {b['s'] / m['s']:.1f}x | "
              f"{_fmt_bytes(m['bytes'])} | {_fmt_bytes(a['bytes'])} | {_fmt_bytes(b['bytes'])} |")
    print("\n| rows read | layout 2 unverified s (before issue 29) | layout 2 verified s | verified / unverified | "
          "per round (unverified, verified) |")
    print("| --- | --- | --- | --- | --- |")
    for r in res["layout2"]["reads"]:
        v, u = res["layout2"]["reads"][r], res[UNVERIFIED]["reads"][r]
        rounds = zip(res[UNVERIFIED]["rounds"], res["layout2"]["rounds"])
        pairs = ", ".join(f"({a[r]['s']:.4f}, {b[r]['s']:.4f})" for a, b in rounds)
        print(f"| {r} | {u['s']:.4f} | {v['s']:.4f} | {v['s'] / u['s']:.2f}x | {pairs} |")
    print("\n| `layers` read (all layers, both entries) | memmap s | layout 1 s | layout 2 s |")
    print("| --- | --- | --- | --- |")
    for n in res["memmap"]["layers"]:
        print(f"| n = {n} | " + " | ".join(f"{res[k]['layers'][n]:.3f}" for k in ("memmap", "layout1", "layout2")) + " |")
    print("\npeak RSS (MB) over the random-row reads: " + ", ".join(
        f"{k} {v['peak_rss_rows_mb']:.0f}" for k, v in res.items()) + "; with the whole-layer reads too: " + ", ".join(
        f"{k} {v['peak_rss_mb']:.0f}" for k, v in res.items()))
    if built:
        print(f"write seconds (all shards, all layers): {json.dumps(built)}")


if __name__ == "__main__":
    main()
