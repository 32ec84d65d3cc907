"""Evaluation of a trained model on a dataset's test split (docs/method.md § 4), from cached features.

Retrieval over the gallery of unique test images and all their captions, zero-shot classification with
the dataset's class names and templates through the chosen text layer and head, and the mutual-kNN
alignment of the learned spaces. CoMM runs are scored by linear probes on labels instead, beside probes on
each unimodal layer and on their concatenation.

Besides the metrics, retrieval scoring keeps the per-query results (an R@k hit per gallery image and per
caption, a zero-shot hit per image) that paired comparisons bootstrap over (core.stats); they are stored
beside the run (store.runs: queries.safetensors) and recomputed from the weights for runs that lack them.
An evaluation result names the dataset version (fingerprint) it ran on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from stratalign.core import scoring as scoring_mod
from stratalign.core.metric_registry import space_scores
from stratalign.core.objectives import Evaluation, objective_named
from stratalign.core.stats import majority_rate
from stratalign.errors import StratalignError
from stratalign.stages.prompts import class_prompts, prompt_features
from stratalign.stages.runs.config import ResolvedRun, RunInputs, inputs_of
from stratalign.stages.runs.data import split_run_tensors, train_features_of
from stratalign.stages.runs.overlap import Overlap, Trained
from stratalign.stages.runs.results import EvalResult
from stratalign.stages.subsets import PairRows, drop_bad_pairs
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import FeatureEntry, FeatureStore
from stratalign.store.runs import EVAL_FINGERPRINT, TEST_SCORED, RunRegistry
from stratalign.train import embed_features, fused_features, model_from_tensors

TrainFeatures = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image features, text features, labels)
Queries = dict[str, np.ndarray]  # per-query results: hits per image / caption, the rows they are of


@dataclass(frozen=True)
class Scored:
    """Metrics of one evaluation (flat dict, in %) and its per-query results (empty for probe scoring)."""

    metrics: dict[str, Any]
    queries: Queries


def _eval_entries(store: FeatureStore, run: ResolvedRun, dataset: str) -> tuple[FeatureEntry, FeatureEntry]:
    """Another dataset's entries of the run's encoders; refuse features from other encoders or weights."""
    train_v, train_t = store.entry(run.vision_entry), store.entry(run.text_entry)
    out = []
    for tr in (train_v, train_t):
        same = [e for e in store.complete_entries(dataset, tr.spec.encoder_spec, tr.spec.pooling, tr.spec.modality)
                if e.spec.encoder == tr.spec.encoder and e.spec.dims == tr.spec.dims]
        if not same:
            raise StratalignError(f"dataset {dataset!r} was extracted with another {tr.spec.encoder_spec} "
                                  f"(weights or preprocessing differ) than run {run.run_id}")
        out.append(same[0])
    return out[0], out[1]


def test_pairs(store: FeatureStore, dataset: str | PairDataset,
               entries: tuple[FeatureEntry, FeatureEntry] | None = None) -> tuple[PairRows, int]:
    """(pairs, pairs dropped) of the test split of a dataset (named, or loaded already), without the pairs that
    have a bad (--skip-bad placeholder) row in the (vision, text) `entries`."""
    ds = dataset if isinstance(dataset, PairDataset) else store.dataset(dataset)
    dataset = ds.name
    pairs, dropped = PairRows(*ds.pairs("test")), 0
    if entries is not None:
        pairs, dropped = drop_bad_pairs(pairs, *entries)
    if len(pairs) == 0:
        why = f" ({dropped} test pairs have an unreadable image or caption)" if dropped else ""
        raise StratalignError(f"dataset {dataset!r} has no test split to evaluate on{why}")
    return pairs, dropped


def test_split(store: FeatureStore, dataset: str | PairDataset,
               entries: tuple[FeatureEntry, FeatureEntry] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(gallery image rows, caption rows, caption -> gallery index, pairs dropped) of the test split
    (`test_pairs`)."""
    pairs, dropped = test_pairs(store, dataset, entries)
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


def score_model(store: FeatureStore, run: ResolvedRun, model: Any, dataset: str | None = None,
                train_features: TrainFeatures | None = None, inputs: RunInputs | None = None, *,
                keep: np.ndarray | None = None) -> Scored:
    """All metrics of one model on a dataset's test split, scored the way the run's objective is evaluated,
    with the per-query results (and the dataset rows of the queries) where the scoring has them. On the run's
    own dataset it scores from the run's inputs (`inputs`, or the ones the run carries): nothing is looked up.
    `keep`: a mask over the test pairs (`test_pairs`) that scores only those (the pairs a run never trained on)."""
    dataset = dataset or run.dataset
    if dataset == run.dataset:
        inputs = inputs or inputs_of(store, run)
        ds, v, t = inputs.dataset, inputs.vision, inputs.text
    else:
        v, t = _eval_entries(store, run, dataset)
        ds = store.dataset(dataset)
    vl, tl = run.vision_layer, run.text_layer
    pairs, dropped = test_pairs(store, ds, (v, t))
    if keep is not None:
        pairs = PairRows(pairs.image_rows[keep], pairs.caption_rows[keep])
    gallery, txt_to_img = np.unique(pairs.image_rows, return_inverse=True)
    cap_rows = pairs.caption_rows
    x_img = v.read_layer(vl, gallery).astype(np.float32)
    x_txt = t.read_layer(tl, cap_rows).astype(np.float32)
    labels_all = ds.images["label"].to_numpy()
    out: dict[str, Any] = {"eval_dataset": dataset, "eval_images": len(gallery), "eval_captions": len(cap_rows),
                           "eval_bad_pairs_dropped": dropped}
    data = _TestData(t, tl, x_img, x_txt, txt_to_img, labels_all[gallery], ds)
    scored = _SCORERS[objective_named(run.objective).evaluation](model, data, train_features)
    queries = scored.queries
    if queries:
        queries = {**queries, "image_rows": gallery.astype(np.int64), "caption_rows": cap_rows.astype(np.int64)}
    return Scored({**out, **scored.metrics}, queries)


def evaluate_model(store: FeatureStore, run: ResolvedRun, model: Any, dataset: str | None = None,
                   train_features: TrainFeatures | None = None) -> dict[str, Any]:
    """All metrics of one model on a dataset's test split (flat dict of floats, in %), scored the way
    the run's objective is evaluated."""
    return score_model(store, run, model, dataset, train_features).metrics


def _score_retrieval(model: Any, data: _TestData, train_features: TrainFeatures | None) -> Scored:
    """Retrieval both ways, zero-shot classification (when the dataset has classes), mutual-kNN alignment."""
    out: dict[str, Any] = {}
    z_img = embed_features(model, data.x_img, "image")
    z_txt = embed_features(model, data.x_txt, "text")
    hits = scoring_mod.retrieval_hits(z_img, z_txt, data.txt_to_img)
    out.update(scoring_mod.recall_of(hits))
    ds = data.dataset
    if ds.class_names and all(x is not None for x in data.labels):
        classes, templates, prompts = class_prompts(ds)
        p = prompt_features(data.text_entry, prompts)[data.text_layer]
        z_p = embed_features(model, p.astype(np.float32), "text").reshape(len(classes), len(templates), -1)
        class_of = {c: i for i, c in enumerate(classes)}
        y = np.array([class_of[x] for x in data.labels])
        class_emb = scoring_mod.class_embeddings(z_p)
        zs = scoring_mod.zero_shot_classify(z_img, class_emb, y)
        out.update({f"zs_{k}": v for k, v in zs.items()})
        rank = scoring_mod.zero_shot_ranks(z_img, class_emb, y)
        hits["zs_top1"] = rank < 1
        if len(classes) >= 5:
            hits["zs_top5"] = rank < 5
        hits["zs_true"] = y.astype(np.int64)
    space = scoring_mod.Space(z_img, z_txt, data.txt_to_img)
    for m in space_scores():  # the registry's metrics of the learned space (core.metric_registry)
        value = getattr(scoring_mod, m.space_score)(space)
        if value is not None:
            out[m.name] = value
    return Scored(out, hits)


def _score_probe(model: Any, data: _TestData, train_features: TrainFeatures | None) -> Scored:
    """Linear probes on labels: the fused CLS output vs each unimodal layer vs their concatenation."""
    x_img, x_txt, txt_to_img, labels = data.x_img, data.x_txt, data.txt_to_img, data.labels
    if train_features is None:
        raise StratalignError("a CoMM run is scored by a linear probe, which needs its training features")
    tr_img, tr_txt, tr_y = train_features
    if any(x is None for x in tr_y) or any(x is None for x in labels):
        raise StratalignError("CoMM evaluation needs a label for every image (a --label-col at ingest)")
    te_img, te_txt, te_y = x_img[txt_to_img], x_txt, labels[txt_to_img]
    if len(set(tr_y)) < 2:  # e.g. a small subset of one class: no probe to fit, and a sweep goes on
        return Scored({"probe_skipped": f"the {len(tr_y)} training pairs hold one class ({tr_y[0]}): no linear "
                                        "probe can be fitted"}, {})
    fused = scoring_mod.linear_probe(fused_features(model, tr_img, tr_txt), tr_y, fused_features(model, te_img, te_txt),
                                     te_y)
    out: dict[str, Any] = {f"probe_{k}": v for k, v in fused.items()}
    out["probe_baselines"] = frozen_probes(tr_img, tr_txt, tr_y, te_img, te_txt, te_y)
    return Scored(out, {})


_FROZEN_PROBES: OrderedDict[str, dict[str, dict[str, float]]] = OrderedDict()  # digest of the inputs -> scores


def frozen_probes(tr_img: np.ndarray, tr_txt: np.ndarray, tr_y: np.ndarray, te_img: np.ndarray, te_txt: np.ndarray,
                  te_y: np.ndarray) -> dict[str, dict[str, float]]:
    """The probes on each frozen layer and on their concatenation: the same for every run that reads the same
    rows (the seeds of a cell with all pairs), so fitted once per process for those inputs (a small LRU)."""
    h = hashlib.sha256()
    for a in (tr_img, tr_txt, te_img, te_txt):
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    for y in (tr_y, te_y):
        h.update(repr(np.asarray(y).tolist()).encode())
    key = h.hexdigest()
    if key not in _FROZEN_PROBES:
        probes = {"image": (tr_img, te_img), "text": (tr_txt, te_txt),
                  "concat": (np.concatenate([tr_img, tr_txt], 1), np.concatenate([te_img, te_txt], 1))}
        _FROZEN_PROBES[key] = {name: {k: round(v, 2) for k, v in scoring_mod.linear_probe(a, tr_y, b, te_y).items()}
                               for name, (a, b) in probes.items()}
        while len(_FROZEN_PROBES) > 8:
            _FROZEN_PROBES.popitem(last=False)
    return {name: dict(v) for name, v in _FROZEN_PROBES[key].items()}


_SCORERS = {Evaluation.RETRIEVAL: _score_retrieval, Evaluation.PROBE: _score_probe}


def _rescore(store: FeatureStore, run_id: str, dataset: str | None) -> tuple[ResolvedRun, dict[str, Any], Scored]:
    """(the run, its training metrics, its evaluation on `dataset`), the heads reloaded from safetensors. On
    another dataset the metrics also hold the test split's `overlap` with the run's training pairs and, where
    there is one, the metrics on the pairs it never trained on (`unseen`)."""
    config, tensors, metrics = RunRegistry(store).load(run_id)
    run = ResolvedRun.from_config(config)
    weights, subset = split_run_tensors(tensors)
    model = model_from_tensors(config, weights)
    needs_train = objective_named(run.objective).evaluation.needs_train_features
    train_features = None
    if needs_train:
        train_features = train_features_of(inputs_of(store, run), run.vision_layer, run.text_layer, subset)
    scored = score_model(store, run, model, dataset, train_features=train_features)
    if dataset is None or dataset == run.dataset:
        return run, metrics, scored
    other = store.dataset(dataset)
    pairs, _ = test_pairs(store, other, _eval_entries(store, run, dataset))
    overlap = Overlap.measure(other, pairs, Trained.of(store.dataset(run.dataset), subset))
    extra: dict[str, Any] = {"overlap": overlap.summary(pairs)}
    if not overlap.unseen.all():
        extra["unseen"] = None
        if overlap.unseen.any():
            unseen = score_model(store, run, model, dataset, train_features=train_features, keep=overlap.unseen)
            extra["unseen"] = {k: v for k, v in unseen.metrics.items() if k != "eval_dataset"}
    return run, metrics, Scored({**scored.metrics, **extra}, scored.queries)


def _queries_meta(run: ResolvedRun, scored: Scored, fingerprint: str) -> dict[str, str]:
    meta = {"dataset": run.dataset, "dataset_fingerprint": fingerprint}
    if "zs_true" in scored.queries:
        meta["zs_majority"] = f"{majority_rate(scored.queries['zs_true']):.6f}"
    return meta


def evaluate_saved_run(store: FeatureStore, run_id: str, dataset: str | None = None) -> EvalResult:
    """Reload a run's heads and evaluate them on its dataset or another one's test split.

    The result names the dataset version it ran on (`eval_dataset_fingerprint`). On another dataset it is
    written to runs/<id>/eval-<dataset>.json (path in `eval_file`; `previous_eval` says whether the result it
    replaced was of the current dataset version or a stale one), with the test split's `overlap` with the
    run's training pairs and the metrics on the pairs it never trained on (`unseen`: None when every pair
    overlaps; absent when none does). On the run's own dataset the per-query
    results are kept (queries.safetensors) and `dataset_changed` flags a dataset replaced since training."""
    registry = RunRegistry(store)
    run, metrics, scored = _rescore(store, run_id, dataset)
    target = dataset or run.dataset
    fingerprint = store.dataset(target).fingerprint  # the version scored (the store holds it: no second decode)
    res = {**scored.metrics, EVAL_FINGERPRINT: fingerprint}
    if target != run.dataset:
        if store.mode == "a":
            _, res["previous_eval"] = registry.stored_eval(run_id, target, fingerprint)
            res["eval_file"] = registry.save_eval(run_id, target, {k: v for k, v in res.items()
                                                                   if k not in ("previous_eval", "eval_file")})
    else:
        if fingerprint != run.dataset_fingerprint:
            res["dataset_changed"] = (f"dataset {target!r} was replaced since run {run_id} was trained "
                                      f"(fingerprint {run.dataset_fingerprint[:12]} then, {fingerprint[:12]} now): "
                                      "these numbers are on the current version, metrics.json on the old one")
        elif scored.queries and store.mode == "a":
            registry.save_queries(run_id, scored.queries, _queries_meta(run, scored, fingerprint))
    kept = ("best_step", "lambda_at_best", "stopped_reason", "message", "restored_before_warmup")
    return EvalResult(run_id, target, fingerprint, {**{k: metrics.get(k) for k in kept if k in metrics}, **res})


def score_saved_run(store: FeatureStore, run_id: str) -> None:
    """Score a run saved without its test scores (a selection run: stages.runs.cells) on its test split, and keep the
    metrics and per-query results as training would have."""
    run, _, scored = _rescore(store, run_id, None)
    registry = RunRegistry(store)
    registry.update_metrics(run_id, {**scored.metrics, TEST_SCORED: True})
    save_run_queries(store, run, scored)


def save_run_queries(store: FeatureStore, run: ResolvedRun, scored: Scored) -> None:
    """Keep the per-query results of a run's evaluation on its own test split (train_run calls this)."""
    if scored.queries and store.mode == "a":
        RunRegistry(store).save_queries(run.run_id, scored.queries, _queries_meta(run, scored, run.dataset_fingerprint))


def run_queries(store: FeatureStore, run_id: str) -> tuple[Queries, dict[str, str]] | None:
    """(per-query results, their metadata) of a run on its own test split: read from the run folder, or
    recomputed from its weights (and kept, in a writable store) for runs that lack them. None for a run
    scored by probes, or whose dataset was replaced since it was trained (its test split is gone)."""
    registry = RunRegistry(store)
    stored = registry.load_queries(run_id)
    config = registry.config(run_id)
    if stored is not None and stored[1].get("dataset_fingerprint") == config.get("dataset_fingerprint"):
        return stored
    if store.dataset_meta(config["dataset"]).get("fingerprint") != config.get("dataset_fingerprint"):
        return None
    run, _, scored = _rescore(store, run_id, None)
    if not scored.queries:
        return None
    meta = _queries_meta(run, scored, run.dataset_fingerprint)
    if store.mode == "a":
        registry.save_queries(run_id, scored.queries, meta)
    return scored.queries, meta
