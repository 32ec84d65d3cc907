"""Extraction overhead and memory: `extract` against the bare model forward, on the embedded encoders.

For each encoder and each N (first N Twemoji images, or N captions for a text encoder), fresh child
processes run, `--repeats` times, alternating so both see the same machine load:
  bare    - items preprocessed into memory first, then only `model(**batch)` is timed (no I/O, no pooling)
  extract - `extract_encoder` into a fresh store (decode, preprocess, forward, pool, write), timed without
            model loading, with peak RSS of the process
The table shows the best (minimum) time of each, their ratio (goal <= 1.15 on CPU), the range of the
per-repeat ratios, rows/s, and the extract child's peak RSS (max over repeats) at both sizes: it should not
grow with N beyond about one shard of buffers. Images default to N = 128 and 512, captions to 512 and 1895
(a caption costs ~30x less than an image, so at 128 a ~1 s run would measure fixed costs only).

    python benchmarks/extract.py                      # all three encoders, 3 repeats
    python benchmarks/extract.py --n 256 1024 --encoders dinov2-s --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(mode: str, encoder_spec: str, n: int, batch_size: int, threads: int) -> dict:
    import torch

    from stratalign.pipeline.device import retain_freed_memory

    retain_freed_memory()  # both children run under the allocator setting extraction uses
    torch.set_num_threads(threads)
    from stratalign.pipeline.encoders import load_encoder
    from stratalign.pipeline.extract import ExtractConfig, extract_encoder
    from stratalign.stores.feature_store import FeatureStore
    from stratalign.stores.media import load_image
    from stratalign.stores.sources import ingest_source

    ds = ingest_source("twemoji", "bench", limit=n)
    enc = load_encoder(encoder_spec, "cpu")
    rows = ds.images.height if enc.modality == "image" else ds.captions.height
    if mode == "bare":
        if enc.modality == "image":
            items = [load_image(p) for p in ds.images["path"].to_list()]
        else:
            items = ds.captions["text"].to_list()
        batches = [enc.preprocess(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]

        def bare(b: dict) -> None:
            if hasattr(enc.model, "config"):  # transformers models take the batch as keywords
                enc.model(**b)
            else:
                enc.model(b["pixel_values"])

        with torch.inference_mode():
            bare(batches[0])  # warm-up, as in the extract child
            t0 = time.perf_counter()
            for b in batches:
                bare(b)
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.open(os.path.join(tmp, "store"), "a", create=True)
        store.save_dataset(ds)
        cfg = ExtractConfig(encoders=(encoder_spec,), batch_size=batch_size, progress=False,
                            torch_threads=threads)  # the same threads as the bare child
        first = [load_image(p) for p in ds.images["path"].to_list()[:batch_size]] if enc.modality == "image" \
            else ds.captions["text"].to_list()[:batch_size]
        enc.forward_pooled(enc.preprocess(first), [enc.default_pooling])  # warm-up, as in the bare child
        t0 = time.perf_counter()
        report = extract_encoder(store, store.dataset("bench"), enc, cfg)
        seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "rows": rows, "forward_s": report.forward_s, "peak_rss_mb": peak_mb}


def run_child(mode: str, encoder: str, n: int, batch_size: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--encoders", encoder, "--n", str(n),
                          "--batch-size", str(batch_size), "--threads", str(threads)],
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
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["bare", "extract"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.encoders[0], args.n[0], args.batch_size, args.threads)))
        return
    header = (f"{'encoder':<20}{'N':>6}{'bare s':>9}{'extract s':>11}{'ratio':>8}{'ratio range':>14}"
              f"{'rows/s':>9}{'peak RSS MB':>13}")
    print(header)
    print("-" * len(header))
    from stratalign.pipeline.encoders import known_encoders

    text = {info.name for info in known_encoders() if info.modality == "text"}
    for enc in args.encoders:
        for n in (args.text_n if enc in text else args.n):
            bare, ext = [], []
            for _ in range(max(1, args.repeats)):
                bare.append(run_child("bare", enc, n, args.batch_size, args.threads))
                ext.append(run_child("extract", enc, n, args.batch_size, args.threads))
            b, e = min(r["seconds"] for r in bare), min(r["seconds"] for r in ext)
            ratios = [x["seconds"] / y["seconds"] for x, y in zip(ext, bare)]
            rows = ext[0]["rows"]
            print(f"{enc:<20}{rows:>6}{b:>9.2f}{e:>11.2f}{e / b:>8.2f}{min(ratios):>7.2f}-{max(ratios):<6.2f}"
                  f"{rows / e:>9.1f}{max(r['peak_rss_mb'] for r in ext):>13.0f}", flush=True)
    print(f"\nratio = best extract wall time / best bare model forward time over {args.repeats} interleaved "
          "repeats (same rows, same batch size; goal <= 1.15 on CPU); ratio range: per-repeat ratios")


if __name__ == "__main__":
    main()
