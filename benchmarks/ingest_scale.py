"""Ingesting a COCO-scale captions file: time and peak RSS of reading it streamed (ijson) against json.load, and of
the whole ingest (read, validate and hash every image, build the tables, save them to a store).

A synthetic `captions_*.json` of `--images` images (default 118,287, COCO train2017) x `--per-image` captions
(default 5: ~590k captions, COCO's field layout and caption lengths), and with `--with-images` one tiny distinct
PNG per image (the whole ingest reads and hashes every image). Each measurement runs in a child process of its
own, so its peak RSS (VmHWM) is its own. With `--before DIR` (a source tree of an earlier commit, e.g.
`git archive 1ed7604 | tar -x -C DIR`) every measurement is repeated with that code, in the same run, on the
same file: before/after ratios of time and peak RSS.

    python benchmarks/ingest_scale.py --images 20000               # the reader only, a sixth of COCO
    python benchmarks/ingest_scale.py --with-images                # COCO scale, the whole ingest too
    python benchmarks/ingest_scale.py --with-images --before /tmp/old   # ... against the code in /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
from peak_rss import peak_rss_mb


def make(root: Path, n_images: int, per_image: int, with_images: bool) -> Path:
    words = ["a", "man", "riding", "wave", "on", "top", "of", "surfboard", "two", "dogs", "playing", "in", "the", "snow"]
    images = [{"license": 1, "file_name": f"{i:012d}.png", "coco_url": f"http://images.example/{i:012d}.jpg",
               "height": 4, "width": 4, "date_captured": "2013-11-14 11:18:45", "id": i} for i in range(n_images)]
    anns = [{"image_id": i, "id": i * per_image + j,
             "caption": " ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(10 + (i + j) % 5)) + "."}
            for i in range(n_images) for j in range(per_image)]
    path = root / "captions_train.json"
    path.write_text(json.dumps({"info": {"description": "synthetic"}, "images": images, "annotations": anns}))
    if with_images:
        from PIL import Image

        (root / "img").mkdir()
        for i in range(n_images):
            Image.new("RGB", (4, 4), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(root / "img" / f"{i:012d}.png")
    return path


def child(args: argparse.Namespace) -> dict:
    if args.mode == "json.load":
        sys.modules["ijson"] = None  # the reader falls back to json.load
    from stratalign.stages.ingest.sources import ingest_source, read_coco

    t0 = time.perf_counter()
    if args.mode == "ingest":
        from stratalign.store.feature_store import FeatureStore

        ds = ingest_source("coco", "coco-synthetic", captions_json=args.file, image_dir=args.images_dir)
        FeatureStore.open(args.store, "a", create=True).save_dataset(ds)
        n = (ds.images.height, getattr(ds, "n_captions", None) or ds.captions.height)
    else:
        images, captions, _ = read_coco(args.file, args.images_dir)
        spilled = hasattr(captions, "spill")  # a SpilledFrame since captions are spilled (a frame before)
        n = (len(images), captions.lazy.select(pl.len()).collect().item() if spilled else len(captions))
    return {"s": time.perf_counter() - t0, "rows": n,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--per-image", type=int, default=5)
    p.add_argument("--with-images", action="store_true", help="write the images too and time the whole ingest")
    p.add_argument("--before", default=None, help="a source tree of earlier code to measure too (its root: PYTHONPATH)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ijson", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--images-dir", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    root = Path(tempfile.mkdtemp(prefix="ingest_scale-"))
    try:
        t0 = time.perf_counter()
        path = make(root, args.images, args.per_image, args.with_images)
        print(f"wrote {path.stat().st_size / 2**20:.0f} MB of JSON in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        modes = ["ijson", "json.load"] + (["ingest"] if args.with_images else [])
        print(f"\n{args.images:,} images x {args.per_image} captions ({path.stat().st_size / 2**20:.0f} MB JSON)\n")
        print("| what | code | seconds | peak RSS MB | images | captions |\n| --- | --- | --- | --- | --- | --- |")
        trees = {"this": str(Path(__file__).resolve().parents[1]), **({"before": args.before} if args.before else {})}
        for mode in modes:
            res = {}
            for code, tree in trees.items():
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--file", str(path),
                       "--images-dir", str(root / "img"), "--store", str(root / f"store-{code}")]
                env = {**os.environ, "PYTHONPATH": tree}
                res[code] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
                label = {"ijson": "read_coco, streamed (ijson)", "json.load": "read_coco, json.load",
                         "ingest": "whole ingest (streamed read, image hashing, tables, save)"}[mode]
                r = res[code]
                print(f"| {label} | {code} | {r['s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rows'][0]:,} | {r['rows'][1]:,} |",
                      flush=True)
            if "before" in res:
                b, a = res["before"], res["this"]
                print(f"| ... before / this | | {b['s'] / a['s']:.2f}x | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x | | |")
        if args.with_images and args.before:
            folders = {c: root / f"store-{c}" / "datasets" / "coco-synthetic" for c in ("this", "before")}
            same = {}
            for f in ("images.parquet", "captions.parquet"):
                same[f"{f} bytes"] = (folders["this"] / f).read_bytes() == (folders["before"] / f).read_bytes()
                same[f"{f} rows"] = pl.read_parquet(folders["this"] / f).equals(pl.read_parquet(folders["before"] / f))
            metas = [json.loads((folders[c] / "dataset.json").read_text()) for c in ("this", "before")]
            same.update({k: metas[0][k] == metas[1][k] for k in ("content_fingerprint", "fingerprint", "skipped")})
            print(f"\nstored tables and fingerprints, this vs before (equal?): {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
