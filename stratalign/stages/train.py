"""Stage 3 runner: resolve a run, gather its cached features, train heads, evaluate, save the run.

Never loads an encoder: features come from the store (zero-shot prompts from the prompt cache that
`extract` fills). A run is content-addressed by its fully resolved config (see store.runs).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stratalign.errors import StratalignError
from stratalign.stages.subsets import PairRows, carve_validation, draw_subset, drop_bad_pairs, subset_from_ids
from stratalign.store.features import FeatureEntry, FeatureStore
from stratalign.store.layer_results import load_choice
from stratalign.store.runs import RunRegistry, run_id_of

OBJECTIVES = ("clip", "clip+structure", "clip+structure-knn", "clip+ib", "clip+vib", "comm", "csa")
HEADS = ("linear", "mlp", "residual", "csa")
# TrainConfig fields that RunConfig sets itself: a --set of one of them names the flag to use instead
RUN_FLAGS = {"objective": "--objective", "head": "--head", "seed": "--seed"}


@dataclass(frozen=True)
class RunConfig:
    """One training run as the user states it; `resolve_run` pins every implicit choice."""

    dataset: str
    vision: str
    text: str
    layers: str = "auto"  # auto (the recorded choice) | last | "V,T"
    head: str = "linear"
    objective: str = "clip"
    n_pairs: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    ids_file: str | None = None
    ids_kind: str = "caption"
    vision_pooling: str | None = None
    text_pooling: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # TrainConfig overrides


def _entries(store: FeatureStore, cfg: RunConfig, dataset: str | None = None) -> tuple[FeatureEntry, FeatureEntry]:
    ds = dataset or cfg.dataset
    v = store.find_entry(ds, cfg.vision, cfg.vision_pooling, modality="image")
    t = store.find_entry(ds, cfg.text, cfg.text_pooling, modality="text")
    return v, t


def _layers(store: FeatureStore, cfg: RunConfig, v: FeatureEntry, t: FeatureEntry) -> tuple[int, int, str]:
    if cfg.layers == "auto":
        choice = load_choice(store, cfg.dataset, cfg.vision, cfg.text)
        return int(choice["vision_layer"]), int(choice["text_layer"]), "auto"
    if cfg.layers == "last":
        return len(v.spec.dims) - 1, len(t.spec.dims) - 1, "last"
    try:
        vs, ts = cfg.layers.split(",")
    except ValueError:
        raise StratalignError(f"--layers must be auto, last or V,T, not {cfg.layers!r}") from None
    return v.resolve_layer(vs.strip()), t.resolve_layer(ts.strip()), f"{vs.strip()},{ts.strip()}"


def resolve_run(store: FeatureStore, cfg: RunConfig) -> dict[str, Any]:
    """The fully resolved config (entries, layer indices, subset size, trainer settings) and its run id."""
    from stratalign.train.trainer import TrainConfig

    if cfg.objective not in OBJECTIVES:
        raise StratalignError(f"unknown objective {cfg.objective!r}; known: {', '.join(OBJECTIVES)}")
    if cfg.head not in HEADS:
        raise StratalignError(f"unknown head {cfg.head!r}; known: {', '.join(HEADS)}")
    if (cfg.objective == "csa") != (cfg.head == "csa"):
        raise StratalignError("the csa head is trained by the csa objective (closed form) and vice versa")
    taken = [k for k, _ in cfg.options if k in RUN_FLAGS]
    if taken:
        raise StratalignError("; ".join(f"--set {k}=... : use {RUN_FLAGS[k]}" for k in taken)
                              + " (the run sets these itself, not through --set)")
    ds = store.dataset(cfg.dataset)
    v, t = _entries(store, cfg)
    vl, tl, rule = _layers(store, cfg, v, t)
    pool, val = carve_validation(ds, cfg.val_fraction, cfg.seed)
    (pool, pool_dropped), (val, val_dropped) = drop_bad_pairs(pool, v, t), drop_bad_pairs(val, v, t)
    if cfg.ids_file:
        ids = Path(cfg.ids_file).read_text().splitlines()
        subset = subset_from_ids(ds, pool, ids, cfg.ids_kind)
        ids_sha = hashlib.sha256("\n".join(sorted(i.strip() for i in ids)).encode()).hexdigest()[:16]
    else:
        subset = draw_subset(pool, cfg.n_pairs, cfg.seed)
        ids_sha = None
    known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    bad = [k for k, _ in cfg.options if k not in known]
    if bad:
        raise StratalignError(f"unknown training option(s) {bad}; known: {sorted(known)}")
    train_cfg = TrainConfig(objective=cfg.objective if cfg.objective != "csa" else "clip", head=cfg.head,
                            seed=cfg.seed, **dict(cfg.options))
    resolved = {
        "dataset": cfg.dataset, "dataset_fingerprint": ds.fingerprint,
        "vision": cfg.vision, "text": cfg.text, "vision_entry": v.key, "text_entry": t.key,
        "vision_layer": vl, "text_layer": tl, "layer_rule": rule,
        "vision_layer_name": v.spec.layer_names[vl], "text_layer_name": t.spec.layer_names[tl],
        "head": cfg.head, "objective": cfg.objective, "seed": cfg.seed,
        "n_pairs": cfg.n_pairs if cfg.n_pairs is not None else len(subset), "n_train": len(subset),
        "n_val": len(val), "val_fraction": cfg.val_fraction, "ids_sha": ids_sha, "ids_kind": cfg.ids_kind,
        "train": _jsonable(asdict(train_cfg)),
    }
    if pool_dropped + val_dropped:  # train/val pairs with a --skip-bad placeholder row; only then (ids stay)
        resolved["bad_pairs_dropped"] = pool_dropped + val_dropped
    resolved["run_id"] = run_id_of({k: v for k, v in resolved.items() if k != "run_id"})
    resolved["_pairs"] = (subset, val)  # not part of the id; dropped before saving
    return resolved


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def gather(entry: FeatureEntry, layer: int, rows: np.ndarray) -> np.ndarray:
    """One layer's features of the given rows as float32."""
    return entry.read_layer(layer, rows).astype(np.float32)


def train_run(store: FeatureStore, cfg: RunConfig, *, resolved: dict[str, Any] | None = None,
              force: bool = False) -> dict[str, Any]:
    """Train (unless the identical run is done), evaluate on the test split, save; returns the metrics."""
    from stratalign.stages.evaluate import evaluate_model
    from stratalign.train import trainer as T

    registry = RunRegistry(store)
    resolved = resolved or resolve_run(store, cfg)
    rid = resolved["run_id"]
    if registry.is_done(rid) and not force:
        return {"run_id": rid, "skipped": True, **registry.metrics(rid)}
    subset, val = resolved["_pairs"]
    v, t = _entries(store, cfg)
    vl, tl = resolved["vision_layer"], resolved["text_layer"]
    pairs = PairRows(np.concatenate([subset.image_rows, val.image_rows]),
                     np.concatenate([subset.caption_rows, val.caption_rows]))
    x_img = gather(v, vl, pairs.image_rows)
    x_txt = gather(t, tl, pairs.caption_rows)
    train_idx = np.arange(len(subset))
    val_idx = np.arange(len(subset), len(pairs))
    train_cfg = T.TrainConfig.from_dict(resolved["train"])
    t0 = time.perf_counter()
    if cfg.objective == "csa":
        model, summary = T.train_csa(x_img[train_idx], x_txt[train_idx], train_cfg)
    elif cfg.objective == "comm":
        model, summary = T.train_comm_run(x_img, x_txt, train_idx, val_idx, train_cfg)
    else:
        graphs, extra = None, {}
        if train_cfg.objective == "clip+structure-knn":  # built once per subset, cached in the store
            graphs, hit = knn_graphs_cached(store, resolved, pairs.image_rows[train_idx],
                                            pairs.caption_rows[train_idx], x_img[train_idx], x_txt[train_idx],
                                            train_cfg.knn_k)
            extra = {"knn_graph_cached": hit}
        model, summary = T.train_run(x_img, x_txt, train_idx, val_idx, train_cfg, graphs=graphs)
        summary = {**summary, **extra}
    train_s = time.perf_counter() - t0
    labels = store.dataset(cfg.dataset).images["label"].to_numpy()[pairs.image_rows[train_idx]]
    metrics = {"run_id": rid, "train_seconds": round(train_s, 3), **summary}
    metrics.update(evaluate_model(store, resolved, model, cfg.dataset, train_features=(x_img[train_idx],
                                                                                       x_txt[train_idx], labels)))
    config = {k: val_ for k, val_ in resolved.items() if not k.startswith("_")}
    tensors = {**T.model_tensors(model), **subset_tensors(subset)}
    registry.save(rid, config, tensors, metrics)
    return {"run_id": rid, "skipped": False, **metrics}


def knn_graphs_cached(store: FeatureStore, resolved: dict[str, Any], image_rows: np.ndarray,
                      caption_rows: np.ndarray, x_img: np.ndarray, x_txt: np.ndarray,
                      k: int) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """((image graph, text graph), came_from_cache) of the training pairs (store rows image_rows /
    caption_rows, features x_img / x_txt in the same order): read from graphs/ or built with FAISS and saved."""
    from stratalign.store import graphs as G
    from stratalign.train import trainer as T

    key = G.graph_key(resolved["vision_entry"], resolved["vision_layer"], resolved["text_entry"],
                      resolved["text_layer"], image_rows, caption_rows, k)
    meta = {"vision_entry": resolved["vision_entry"], "text_entry": resolved["text_entry"],
            "vision_layer": str(resolved["vision_layer"]), "text_layer": str(resolved["text_layer"]),
            "n_train": str(len(image_rows)), "k": str(k)}
    return G.cached_graphs(store, key, len(image_rows),
                           lambda: T.knn_graphs(x_img, x_txt, np.arange(len(x_img)), k), meta)


SUBSET_KEYS = ("subset_image_rows", "subset_caption_rows")


def subset_tensors(subset: PairRows) -> dict[str, Any]:
    """The exact training rows, saved with the weights (reproducibility, CoMM probes on reload)."""
    import torch

    return {SUBSET_KEYS[0]: torch.from_numpy(subset.image_rows.astype(np.int64)),
            SUBSET_KEYS[1]: torch.from_numpy(subset.caption_rows.astype(np.int64))}


def split_run_tensors(tensors: dict[str, Any]) -> tuple[dict[str, Any], PairRows]:
    """(model tensors, training rows) of a saved run."""
    model = {k: v for k, v in tensors.items() if k not in SUBSET_KEYS}
    return model, PairRows(tensors[SUBSET_KEYS[0]].numpy(), tensors[SUBSET_KEYS[1]].numpy())


def train_features_of(store: FeatureStore, config: dict[str, Any], subset: PairRows) -> tuple[np.ndarray, ...]:
    """(image features, text features, labels) of a saved run's training pairs."""
    v, t = store.entry(config["vision_entry"]), store.entry(config["text_entry"])
    labels = store.dataset(config["dataset"]).images["label"].to_numpy()[subset.image_rows]
    return (gather(v, config["vision_layer"], subset.image_rows), gather(t, config["text_layer"], subset.caption_rows),
            labels)
