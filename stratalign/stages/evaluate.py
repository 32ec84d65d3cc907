"""Evaluation of a trained model on a dataset's test split (METHOD.md section 4), from cached features.

Retrieval over the gallery of unique test images and all their captions, zero-shot classification with
the dataset's class names and templates through the chosen text layer and head, and the mutual-kNN
alignment of the learned spaces. CoMM runs are scored by linear probes on labels instead, beside probes on
each unimodal layer and on their concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stratalign.core import scoring as E
from stratalign.core.objectives import Evaluation, objective_named
from stratalign.errors import StratalignError
from stratalign.stages.prompts import class_prompts, prompt_features
from stratalign.stages.run_config import ResolvedRun
from stratalign.stages.run_data import LayerCache, gather, split_run_tensors, train_features_of
from stratalign.stages.subsets import PairRows, drop_bad_pairs
from stratalign.store.datasets import PairDataset
from stratalign.store.features import FeatureEntry, FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.train import embed_features, fused_features, model_from_tensors

TrainFeatures = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image features, text features, labels)


def _eval_entries(store: FeatureStore, run: ResolvedRun, dataset: str) -> tuple[FeatureEntry, FeatureEntry]:
    """The eval dataset's entries of the run's encoders; refuse features from other encoders or weights."""
    train_v, train_t = store.entry(run.vision_entry), store.entry(run.text_entry)
    if dataset == run.dataset:
        return train_v, train_t
    out = []
    for tr in (train_v, train_t):
        same = [e for e in store.complete_entries(dataset, tr.spec.encoder_spec, tr.spec.pooling, tr.spec.modality)
                if e.spec.encoder == tr.spec.encoder and e.spec.dims == tr.spec.dims]
        if not same:
            raise StratalignError(f"dataset {dataset!r} was extracted with another {tr.spec.encoder_spec} "
                                  f"(weights or preprocessing differ) than run {run.run_id}")
        out.append(same[0])
    return out[0], out[1]


def test_split(store: FeatureStore, dataset: str, entries: tuple[FeatureEntry, FeatureEntry] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(gallery image rows, caption rows, caption -> gallery index, pairs dropped) of the test split, without
    the pairs that have a bad (--skip-bad placeholder) row in the (vision, text) `entries`."""
    ds = store.dataset(dataset)
    pairs, dropped = PairRows(*ds.pairs("test")), 0
    if entries is not None:
        pairs, dropped = drop_bad_pairs(pairs, *entries)
    if len(pairs) == 0:
        why = f" ({dropped} test pairs have an unreadable image or caption)" if dropped else ""
        raise StratalignError(f"dataset {dataset!r} has no test split to evaluate on{why}")
    gallery, txt_to_img = np.unique(pairs.image_rows, return_inverse=True)
    return gallery, pairs.caption_rows, txt_to_img, dropped


@dataclass(frozen=True)
class _TestData:
    """A run's test-split features on one dataset."""

    text_entry: FeatureEntry
    text_layer: int
    x_img: np.ndarray  # gallery images
    x_txt: np.ndarray  # captions
    txt_to_img: np.ndarray  # caption -> gallery index
    labels: np.ndarray  # of the gallery images
    dataset: PairDataset
    cache: LayerCache | None = None


def evaluate_model(store: FeatureStore, run: ResolvedRun, model: Any, dataset: str | None = None,
                   train_features: TrainFeatures | None = None, cache: LayerCache | None = None) -> dict[str, Any]:
    """All metrics of one model on a dataset's test split (flat dict of floats, in %), scored the way
    the run's objective is evaluated. `cache` (a sweep's): test features and prompts read once."""
    dataset = dataset or run.dataset
    v, t = _eval_entries(store, run, dataset)
    vl, tl = run.vision_layer, run.text_layer
    gallery, cap_rows, txt_to_img, dropped = test_split(store, dataset, (v, t))
    ds = store.dataset(dataset)
    x_img, x_txt = gather(v, vl, gallery, cache), gather(t, tl, cap_rows, cache)
    labels_all = ds.images["label"].to_numpy()
    out: dict[str, Any] = {"eval_dataset": dataset, "eval_images": len(gallery), "eval_captions": len(cap_rows),
                           "eval_bad_pairs_dropped": dropped}
    data = _TestData(t, tl, x_img, x_txt, txt_to_img, labels_all[gallery], ds, cache)
    scorer = _SCORERS[objective_named(run.objective).evaluation]
    return {**out, **scorer(model, data, train_features)}


def _prompts(entry: FeatureEntry, prompts: list[str], cache: LayerCache | None) -> list[np.ndarray]:
    if cache is None:
        return prompt_features(entry, prompts)
    key = (entry.key, tuple(prompts))
    if key not in cache.prompts:
        cache.prompts[key] = prompt_features(entry, prompts)
    return cache.prompts[key]


def _score_retrieval(model: Any, data: _TestData, train_features: TrainFeatures | None) -> dict[str, Any]:
    """Retrieval both ways, zero-shot classification (when the dataset has classes), mutual-kNN alignment."""
    out: dict[str, Any] = {}
    z_img = embed_features(model, data.x_img, "image")
    z_txt = embed_features(model, data.x_txt, "text")
    out.update(E.retrieval_recall(z_img, z_txt, data.txt_to_img))
    ds = data.dataset
    if ds.class_names and all(x is not None for x in data.labels):
        classes, templates, prompts = class_prompts(ds)
        p = _prompts(data.text_entry, prompts, data.cache)[data.text_layer]
        z_p = embed_features(model, p.astype(np.float32), "text").reshape(len(classes), len(templates), -1)
        class_of = {c: i for i, c in enumerate(classes)}
        y = np.array([class_of[x] for x in data.labels])
        zs = E.zero_shot_classify(z_img, E.class_embeddings(z_p), y)
        out.update({f"zs_{k}": v for k, v in zs.items()})
    if len(data.x_img) > 10:  # one caption per image: repeated image rows would be each other's neighbours
        first_caption = np.unique(data.txt_to_img, return_index=True)[1]
        out["alignment_mknn"] = 100.0 * E.alignment_score(z_img, z_txt[first_caption], k="rice")
    return out


def _score_probe(model: Any, data: _TestData, train_features: TrainFeatures | None) -> dict[str, Any]:
    """Linear probes on labels: the fused CLS output vs each unimodal layer vs their concatenation."""
    x_img, x_txt, txt_to_img, labels = data.x_img, data.x_txt, data.txt_to_img, data.labels
    if train_features is None:
        raise StratalignError("a CoMM run is scored by a linear probe, which needs its training features")
    tr_img, tr_txt, tr_y = train_features
    if any(x is None for x in tr_y) or any(x is None for x in labels):
        raise StratalignError("CoMM evaluation needs a label for every image (a --label-col at ingest)")
    te_img, te_txt, te_y = x_img[txt_to_img], x_txt, labels[txt_to_img]
    probes = {
        "fused": (fused_features(model, tr_img, tr_txt), fused_features(model, te_img, te_txt)),
        "image": (tr_img, te_img),
        "text": (tr_txt, te_txt),
        "concat": (np.concatenate([tr_img, tr_txt], 1), np.concatenate([te_img, te_txt], 1)),
    }
    out: dict[str, Any] = {}
    baselines = {}
    for name, (a, b) in probes.items():
        res = E.linear_probe(a, tr_y, b, te_y)
        if name == "fused":
            out.update({f"probe_{k}": v for k, v in res.items()})
        else:
            baselines[name] = {k: round(v, 2) for k, v in res.items()}
    out["probe_baselines"] = baselines
    return out


_SCORERS = {Evaluation.RETRIEVAL: _score_retrieval, Evaluation.PROBE: _score_probe}


def evaluate_saved_run(store: FeatureStore, run_id: str, dataset: str | None = None) -> dict[str, Any]:
    """Reload a run's heads from safetensors and evaluate them (on its dataset or another one)."""
    registry = RunRegistry(store)
    config, tensors, metrics = registry.load(run_id)
    run = ResolvedRun.from_config(config)
    weights, subset = split_run_tensors(tensors)
    model = model_from_tensors(config, weights)
    needs_train = objective_named(run.objective).evaluation.needs_train_features
    train_features = train_features_of(store, run, subset) if needs_train else None
    res = evaluate_model(store, run, model, dataset, train_features=train_features)
    if dataset and dataset != run.dataset and store.mode == "a":
        registry.save_eval(run_id, dataset, res)
    kept = ("best_step", "lambda_at_best", "stopped_reason", "message", "restored_before_warmup")
    return {**{k: metrics.get(k) for k in kept if k in metrics}, **res}
