"""A trained run used as a model reproduces its own metrics from the raw files (issue 17's acceptance check).

    python benchmarks/use_model.py --store /tmp/copy-of-store --run clip-linear-n1219-s0-5ac1

On the run's test split:
- search: every test caption, encoded fresh through the text encoder (cut at the run's layer), searched in the
  stored FAISS index of the test images (`stratalign index/search`); rank-1 rate vs the run's t2i R@1;
- the same with the gallery encoded fresh from the PNG files (AlignedModel.encode_image);
- classify: the test images, encoded fresh, zero-shot among the dataset's classes with its templates;
  accuracy vs the run's zs_top1;
- the largest |fresh - cached| over the gallery embeddings.
Writes into the store (the index): run it on a copy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stratalign.stages.runs.evaluate import test_split
from stratalign.store.feature_store import FeatureStore
from stratalign.use.model import AlignedModel
from stratalign.use.search import dataset_index, dataset_vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    store = FeatureStore.open(args.store, "a")
    model = AlignedModel.from_run(store, args.run, device=args.device)
    metrics, ds_name = model.card["metrics"], model.card["dataset"]
    ds = store.dataset(ds_name)
    entries = (store.entry(model.card["towers"]["image"]["entry"]), store.entry(model.card["towers"]["text"]["entry"]))
    gallery, cap_rows, txt_to_img, _ = test_split(store, ds_name, entries)
    print(f"{model}\ntest split: {len(gallery)} images, {len(cap_rows)} captions")

    t0 = time.perf_counter()
    z_txt = model.encode_text(ds.captions["text"].to_numpy()[cap_rows].tolist())
    t_txt = time.perf_counter() - t0
    idx = dataset_index(store, model, ds_name, "image", "test")
    assert np.array_equal(idx.rows, gallery), "the index's rows are the test gallery"
    _, top = idx.index.search(np.ascontiguousarray(z_txt), 1)
    rate = 100.0 * np.mean(idx.rows[top[:, 0]] == gallery[txt_to_img])
    print(f"search (index from {idx.source}, {'reused' if idx.reused else 'built'}; captions encoded fresh in "
          f"{t_txt:.1f} s): rank-1 rate {rate:.2f}%  vs run t2i_R@1 {metrics['t2i_R@1']:.2f}%")

    t0 = time.perf_counter()
    z_img = model.encode_image(ds.images["path"].to_numpy()[gallery].tolist())
    t_img = time.perf_counter() - t0
    cached = dataset_vectors(store, model, ds, "image", gallery)[0]
    fresh_top = np.argmax(z_txt @ z_img.T, axis=1)
    rate_fresh = 100.0 * np.mean(fresh_top == txt_to_img)
    print(f"gallery encoded fresh from the files in {t_img:.1f} s ({len(gallery) / t_img:.1f} img/s): rank-1 rate "
          f"{rate_fresh:.2f}%; max |fresh - cached| image embedding {np.abs(z_img - cached).max():.2e}")

    if model.card.get("zero_shot") and metrics.get("zs_top1") is not None:
        classes, emb = model.class_embeddings()
        res = (z_img @ emb.T).argmax(1)
        labels = ds.images["label"].to_numpy()[gallery]
        acc = 100.0 * np.mean(np.array(classes)[res] == labels)
        print(f"classify ({len(classes)} classes x {len(model.class_prompts()[1])} templates, fresh images): "
              f"accuracy {acc:.2f}%  vs run zs_top1 {metrics['zs_top1']:.2f}%")


if __name__ == "__main__":
    main()
