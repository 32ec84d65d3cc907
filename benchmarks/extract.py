"""Extraction overhead and memory: `extract` against the bare model forward, on the embedded encoders.

For each encoder and each N (first N Twemoji images, or N captions for a text encoder):
  time child   - loads the encoder once, preprocesses the N items into memory, warms both paths up, then runs
                 `--repeats` rounds of, in alternating order,
                   bare    - only `model(**batch)` over the in-memory batches (no I/O, no pooling),
                   extract - `extract_encoder` into a fresh store (decode, preprocess, forward, pool, write);
                 the two share one process and one model, and each round's pair runs back to back, so the
                 machine's slow and fast phases (+-15% here) cancel in the per-round ratio;
  memory child - a fresh process that only extracts: its peak RSS, and its RSS once the model is loaded.
Both children start extraction's loader processes before they load the model, as `extract()` does (on CPU,
image batches are decoded in low-priority processes: stratalign/stages/extract/image_loaders.py); `--loaders threads`
measures the loader threads instead.
The table shows the median bare and extract times, the median of the per-round ratios (goal <= 1.15 on CPU)
and their range, rows/s, and the memory child's peak RSS and growth over the loaded model. Shards are
`--shard-rows` rows (default 256), so the larger N spans several shards: the peak should not grow with N
beyond about one shard of buffers. Images default to N = 128 and 512, captions to 512 and 1895 (a caption
costs ~30x less than an image, so at 128 a ~1 s run would measure fixed costs only).

    python benchmarks/extract.py                      # all three encoders, 3 rounds
    python benchmarks/extract.py --encoders minilm-l6 efficientnet-lite0 --repeats 9
    python benchmarks/extract.py --n 256 1024 --encoders dinov2-s --repeats 1

The precision axis (`--precision-axis`, issue 30): per encoder, one process preprocesses N items once, then runs
extraction's forward (`forward_pooled`, as stages/extract/shards.py calls it, under the allocator setting
extraction uses) in fp32 and under bf16 autocast, alternating round by round; it prints rows/s of each, their
ratio, and per layer the fidelity of the bf16 pooled features against fp32: mean row cosine (its worst layer) and
max |diff| / scale (scale: the layer's max |fp32|); and, since a mean cosine near 1 can hide an error that is large
against how much the rows differ from each other (pooled features share a large common vector), the error's norm
against the fp32 rows' centred spread, ||bf16 - fp32|| / ||fp32 - mean||, with the share of it that is one constant
offset. An encoder with its own bf16 path (DINOv2:
encoders/dinov2_bf16.py) is also timed as the plain model under autocast, in the same rounds ("autocast").
`--threads 1` measures one core.

    python benchmarks/extract.py --precision-axis --encoders dinov2-s efficientnet-lite0 --n 64 --repeats 3

Measured 2026-12-06 on the 2-core AMD EPYC (avx512_bf16) while other sessions loaded it (uptime 4-8), DINOv2-S at
N = 128: bf16 / fp32 images/s 1.50x, 1.74x, 1.74x and 2.04x in four runs at 2 threads, batch 32 (rounds 1.19-2.25x;
the plain model under autocast 0.97-1.66x in the same runs), 2.04x at batch 64, 2.05x on 1 thread (autocast 1.52x); every layer's
cosine to fp32 >= 0.99997 (max |diff| 0.93 % of the layer's scale), as under plain autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(mode: str, encoder_spec: str, n: int, batch_size: int, threads: int, shard_rows: int,
          repeats: int, loaders: str) -> dict:
    import torch

    from stratalign.device import retain_freed_memory

    retain_freed_memory()  # both paths run under the allocator setting extraction uses
    torch.set_num_threads(threads)
    from stratalign.encoders import load_encoder
    from stratalign.stages.extract import (
        ExtractConfig,
        choose_loaders,
        extract_encoder,
        start_loader_processes,
    )
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.media import load_image

    ds = ingest_source("twemoji", "bench", limit=n)
    cfg = ExtractConfig(encoders=(encoder_spec,), batch_size=batch_size, progress=False, torch_threads=threads,
                        shard_rows=shard_rows, loaders=loaders)  # the same threads as the bare path
    start_loader_processes(cfg, torch.device("cpu"))  # before the model, as `extract()` does
    enc = load_encoder(encoder_spec, "cpu")
    image = enc.modality == "image"
    rows = ds.images.height if image else ds.captions.height

    stolen = []  # batches the loader thread prepared itself because a loader process was late

    def extract_once() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            store = FeatureStore.open(os.path.join(tmp, "store"), "a", create=True)
            store.save_dataset(ds)
            t0 = time.perf_counter()
            report = extract_encoder(store, store.dataset("bench"), enc, cfg)
            seconds = time.perf_counter() - t0
            stolen.append(report.batches_stolen)
            return seconds

    if mode == "memory":
        first = ([load_image(p) for p in ds.images["path"].to_list()[:batch_size]] if image
                 else ds.captions["text"].to_list()[:batch_size])
        enc.forward_pooled(enc.preprocess(first), [enc.default_pooling])  # warm-up
        loaded = _rss_mb()
        seconds = extract_once()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "rows": rows, "loaded_rss_mb": loaded, "peak_rss_mb": peak, "stolen": stolen[0]}

    kind = choose_loaders(cfg, enc, torch.device("cpu"))
    items = [load_image(p) for p in ds.images["path"].to_list()] if image else ds.captions["text"].to_list()
    batches = [enc.preprocess(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]

    def bare_once() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in batches:
                if hasattr(enc.model, "config"):  # transformers models take the batch as keywords
                    enc.model(**b)
                else:
                    enc.model(b["pixel_values"])
            return time.perf_counter() - t0

    bare_once(), extract_once()  # warm-up of both paths
    stolen.clear()
    bare, ext = [], []
    for r in range(repeats):
        if r % 2 == 0:
            bare.append(bare_once())
            ext.append(extract_once())
        else:
            ext.append(extract_once())
            bare.append(bare_once())
    return {"bare": bare, "extract": ext, "rows": rows, "loaders": kind, "stolen": stolen}


def precision_child(encoder_spec: str, n: int, batch_size: int, threads: int, repeats: int) -> dict:
    """fp32 against bf16 autocast of extraction's forward on the same preprocessed batches (see the docstring)."""
    import numpy as np
    import torch

    from stratalign.device import retain_freed_memory
    from stratalign.encoders import load_encoder
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.media import load_image

    retain_freed_memory()  # as extraction runs (stratalign.device): without it each forward page-faults afresh
    torch.set_num_threads(threads)
    ds = ingest_source("twemoji", "bench", limit=n)
    enc = load_encoder(encoder_spec, "cpu")
    own_path = getattr(enc, "bf16_path", None)
    image = enc.modality == "image"
    items = [load_image(p) for p in ds.images["path"].to_list()] if image else ds.captions["text"].to_list()
    batches = [enc.preprocess(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    pooling = enc.default_pooling

    def forward(name: str) -> tuple[float, list[np.ndarray]]:
        parts = []
        if own_path is not None:  # "autocast": the plain model under autocast, not the encoder's own bf16 path
            enc.bf16_path = None if name == "autocast" else own_path
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            t0 = time.perf_counter()
            for b in batches:
                parts.append([t.float().numpy() for t in enc.forward_pooled(b, [pooling])[pooling]])
            seconds = time.perf_counter() - t0
        if own_path is not None:
            enc.bf16_path = own_path
        return seconds, [np.concatenate(layer) for layer in zip(*parts)]

    names = ["fp32", "bf16"] + (["autocast"] if own_path is not None else [])
    for name in names:  # warm-up
        forward(name)
    secs: dict[str, list[float]] = {name: [] for name in names}
    layers = {}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, layers[name] = forward(name)
            secs[name].append(seconds)

    def fidelity(other: str) -> tuple[list[float], list[float], list[float], list[float]]:
        cos, rel, spread, offset = [], [], [], []
        for a, b in zip(layers["fp32"], layers[other]):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            norms = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-30)
            cos.append(float(((a64 * b64).sum(1) / norms).mean()))
            rel.append(float(np.abs(a64 - b64).max() / max(np.abs(a64).max(), 1e-30)))
            d = b64 - a64
            spread.append(float(np.linalg.norm(d) / max(np.linalg.norm(a64 - a64.mean(0)), 1e-30)))
            offset.append(float(len(d) * np.square(d.mean(0)).sum() / max(np.square(d).sum(), 1e-30)))
        return cos, rel, spread, offset

    cos, rel, spread, offset = fidelity("bf16")
    out = {"rows": len(items), "fp32": secs["fp32"], "bf16": secs["bf16"], "cos": cos, "rel": rel, "spread": spread,
           "offset": offset}
    if own_path is not None:
        out["autocast"], out["autocast_cos"] = secs["autocast"], fidelity("autocast")[0]
    return out


def precision_axis(args: argparse.Namespace) -> None:
    """The precision table: rows/s in fp32 and bf16 and the bf16 features' fidelity per encoder."""
    header = (f"{'encoder':<20}{'N':>6}{'fp32 rows/s':>13}{'bf16 rows/s':>13}{'speed-up':>10}{'min cos':>10}"
              f"{'max|diff|/scale':>17}")
    print(header)
    print("-" * len(header))
    for enc in args.encoders:
        out = subprocess.run([sys.executable, __file__, "--child", "precision", "--encoders", enc, "--n", str(args.n[0]),
                              "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                              "--repeats", str(args.repeats)], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(f"{enc:<20} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        t = json.loads(out.stdout.strip().splitlines()[-1])
        f32, b16 = t["rows"] / statistics.median(t["fp32"]), t["rows"] / statistics.median(t["bf16"])
        print(f"{enc:<20}{t['rows']:>6}{f32:>13.1f}{b16:>13.1f}{b16 / f32:>9.2f}x{min(t['cos']):>10.5f}"
              f"{max(t['rel']):>16.2%}", flush=True)
        rounds = [f / b for f, b in zip(t["fp32"], t["bf16"])]
        print(f"  speed-up per round: {' '.join(f'{r:.2f}x' for r in rounds)}")
        print("  per layer cos: " + " ".join(f"{c:.5f}" for c in t["cos"]))
        print("  per layer max|diff|/scale: " + " ".join(f"{r:.2%}" for r in t["rel"]), flush=True)
        print("  per layer |bf16 - fp32| / |fp32 - its mean| (Frobenius, over the N rows): "
              + " ".join(f"{r:.2%}" for r in t["spread"]))
        print("  per layer share of that error in its mean over rows (a constant offset): "
              + " ".join(f"{r:.2f}" for r in t["offset"]), flush=True)
        if "autocast" in t:
            ac = t["rows"] / statistics.median(t["autocast"])
            print(f"  the plain model under autocast (not extraction's path): {ac:.1f} rows/s, {ac / f32:.2f}x, "
                  f"min cos {min(t['autocast_cos']):.5f}; the own bf16 path {b16 / ac:.2f}x that", flush=True)


def run_child(mode: str, encoder: str, n: int, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--encoders", encoder, "--n", str(n),
                          "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                          "--shard-rows", str(args.shard_rows), "--repeats", str(args.repeats),
                          "--loaders", args.loaders],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"child {mode} {encoder} n={n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[128, 512], help="image rows")
    ap.add_argument("--text-n", type=int, nargs="+", default=[512, 1895], help="caption rows")
    ap.add_argument("--encoders", nargs="+", default=["minilm-l6", "efficientnet-lite0", "dinov2-s"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (bare, extract) in the time child")
    ap.add_argument("--loaders", default="auto", choices=["auto", "processes", "threads"],
                    help="extraction's loaders (auto: processes for the image encoders)")
    ap.add_argument("--child", choices=["time", "memory", "precision"])
    ap.add_argument("--precision-axis", action="store_true", help="fp32 against bf16 forwards instead (see above)")
    args = ap.parse_args()
    if args.child == "precision":
        print(json.dumps(precision_child(args.encoders[0], args.n[0], args.batch_size, args.threads,
                                         max(1, args.repeats))))
        return
    if args.precision_axis:
        precision_axis(args)
        return
    if args.child:
        print(json.dumps(child(args.child, args.encoders[0], args.n[0], args.batch_size, args.threads,
                               args.shard_rows, max(1, args.repeats), args.loaders)))
        return
    header = (f"{'encoder':<20}{'loaders':>10}{'N':>6}{'shards':>7}{'bare s':>9}{'extract s':>11}{'ratio':>8}{'ratio range':>14}"
              f"{'rows/s':>9}{'peak RSS MB':>13}{'growth MB':>11}{'stolen':>8}")
    print(header)
    print("-" * len(header))
    from stratalign.encoders import known_encoders

    text = {info.name for info in known_encoders() if info.modality == "text"}
    for enc in args.encoders:
        for n in (args.text_n if enc in text else args.n):
            t = run_child("time", enc, n, args)
            m = run_child("memory", enc, n, args)
            ratios = [e / b for e, b in zip(t["extract"], t["bare"])]
            b, e = statistics.median(t["bare"]), statistics.median(t["extract"])
            rows = t["rows"]
            print(f"{enc:<20}{t['loaders']:>10}{rows:>6}{-(-rows // args.shard_rows):>7}{b:>9.2f}{e:>11.2f}"
                  f"{statistics.median(ratios):>8.2f}{min(ratios):>7.2f}-{max(ratios):<6.2f}{rows / e:>9.1f}"
                  f"{m['peak_rss_mb']:>13.0f}{m['peak_rss_mb'] - m['loaded_rss_mb']:>11.0f}"
                  f"{sum(t['stolen']):>5}/{m['stolen']:<2}", flush=True)
    print(f"\nratio = median over {args.repeats} rounds of extract wall time / bare model forward time, both in "
          "one process, back to back (same rows, same batch size; goal <= 1.15 on CPU); ratio range: the rounds' "
          "ratios; peak RSS: a fresh process that only extracts; growth: its peak less its RSS once the model "
          "was loaded; stolen: batches the loader thread prepared itself because a loader process was late, in all "
          "timed rounds / in the memory run")


if __name__ == "__main__":
    main()
