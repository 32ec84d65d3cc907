"""The stages of `store_scale.py` at scale: the synthetic store's dataset record, and the `layers` and `train`
stages run through the library (`stages.layers.run_layers`, `stages.runs.training.train_run`) in child processes.

The entries of `store_scale.py` are the features of a real dataset record: `build_dataset` + `save_dataset`
(the store's own validation and fingerprints), rows//5 images with five captions each (COCO's shape), a
Karpathy-like split (5,000 val and 5,000 test images, the rest train; a tenth each below 50,000 images). Every
image row names the same 1x1 PNG file (the features are synthetic, so no image is ever decoded for them; one
file keeps the record's build cheap), with its own id and caption texts. The entries' encoder spec names
their layout (`synthetic-text-layout2`), so that each stage can be pointed at either layout.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from peak_rss import peak_rss_mb

DATASET = "coco-synthetic"


def encoder_name(modality: str, layout: int) -> str:
    return f"synthetic-{modality}-layout{layout}"


def n_images(rows: int) -> int:
    return max(1, rows // 5)


def build_dataset_record(root: Path, rows: int) -> float:
    """Validate and save the dataset the entries belong to (through the store's APIs); returns its seconds."""
    from PIL import Image

    from stratalign.store.datasets import RawCaption, RawImage, build_dataset
    from stratalign.store.feature_store import FeatureStore

    t0 = time.perf_counter()
    png = root / "pixel.png"
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (127, 127, 127)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    n_img = n_images(rows)
    held = 5000 if n_img >= 50_000 else max(1, n_img // 10)  # val and test images each
    split = ["train"] * (n_img - 2 * held) + ["val"] * held + ["test"] * held
    images = [RawImage(image_id=f"img{i}", path=str(png), relpath="pixel.png", split=split[i]) for i in range(n_img)]
    captions = [RawCaption(caption_id=f"cap{j}", image_id=f"img{j // 5 % n_img}", text=f"caption {j % 5} of image {j // 5}")
                for j in range(rows)]
    ds = build_dataset(DATASET, images, captions, source={"kind": "synthetic", "rows": rows})
    FeatureStore.open(str(root / "store"), "a", create=True).save_dataset(ds)
    return time.perf_counter() - t0


def content_fingerprint(root: Path) -> str:
    from stratalign.store.feature_store import FeatureStore

    return FeatureStore.open(str(root / "store"), "r").dataset(DATASET).content_fingerprint


def stage_child(args: argparse.Namespace) -> dict:
    """One stage run in this process (its peak RSS is the stage's): `layers` at n = args.n, or one `train` run."""
    from stratalign.stages.layers import LayersConfig, run_layers
    from stratalign.stages.runs.config import RunConfig, resolve_run
    from stratalign.stages.runs.training import train_run
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(Path(args.dir) / "store"), "a")
    vision, text = encoder_name("image", args.layout), encoder_name("text", args.layout)
    t0 = time.perf_counter()
    if args.method == "layers":
        out = run_layers(store, LayersConfig(dataset=DATASET, vision=vision, text=text, n=args.n), rule="best",
                         recompute=True)
        res = {"n": out.result["n"], "k": out.result["k"], "read_s": out.result["seconds"]["read"],
               "compute_s": out.result["seconds"]["compute"], "choice": [out.choice["vision_layer"], out.choice["text_layer"]]}
    else:
        cfg = RunConfig(dataset=DATASET, vision=vision, text=text, layers="last", preset="cpu", n_pairs=args.train_pairs)
        run = resolve_run(store, cfg)
        m = train_run(store, cfg, resolved=run, force=True)
        res = {"n_train": run.n_train, "n_val": run.n_val, "train_s": m["train_seconds"], "steps": m["steps_taken"],
               "eval_images": m["eval_images"], "eval_captions": m["eval_captions"],
               "t2i_R@1": m.get("t2i_R@1"), "i2t_R@1": m.get("i2t_R@1")}
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def stage_table(args: argparse.Namespace, res: dict) -> None:
    """The stages' rows: wall seconds, the stage's own read seconds, peak RSS, per layout."""
    print("\n| stage (through the library, own process) | layout | wall s | read s | compute / train s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (stage, layout, _), r in res.items():
        if stage == "layers":
            what = f"`layers` n = {r['n']:,} ({args.layers}x{args.layers} pairs, k = {r['k']})"
            print(f"| {what} | {layout} | {r['wall_s']:.2f} | {r['read_s']:.3f} | {r['compute_s']:.2f} | "
                  f"{r['peak_rss_mb']:.0f} |")
        else:
            what = (f"`train` clip/linear, cpu preset, {r['n_train']:,} train / {r['n_val']:,} val pairs, {r['steps']} steps, "
                    f"test {r['eval_images']:,} images / "
                    f"{r['eval_captions']:,} captions")
            print(f"| {what} | {layout} | {r['wall_s']:.1f} | - | {r['train_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    reads = {r["n"]: r["read_s"] for (stage, layout, _), r in res.items() if stage == "layers" and layout == 2}
    if len(reads) > 1:
        lo, hi = min(reads), max(reads)
        print("\n`layers` read seconds per 1,000 rows sampled (layout 2): " + ", ".join(
            f"n = {n:,}: {1000 * s / n:.4f}" for n, s in sorted(reads.items()))
            + f" (n ratio {hi / lo:.0f}x, read-time ratio {reads[hi] / reads[lo]:.1f}x)")
