"""Stage 3 runner: resolve a run, gather its cached features, train, evaluate, save the run.

Never loads an encoder: features come from the store (zero-shot prompts from the prompt cache that
`extract` fills). A run is content-addressed by its fully resolved config (see run_config and store.runs).
How a model is trained and scored comes from its objective's registry entry (core.objectives).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from stratalign.core.objectives import Training, objective_named
from stratalign.errors import StratalignError
from stratalign.stages.evaluate import save_run_queries, score_model
from stratalign.stages.run_config import RUN_FLAGS, ResolvedRun, RunConfig, resolve_run, run_entries
from stratalign.stages.run_data import gather, subset_tensors, validation_targets
from stratalign.stages.subsets import PairRows
from stratalign.store import graphs as G
from stratalign.store.features import FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.train import fit_objective, knn_graphs, model_tensors
from stratalign.train.loop import Progress


@contextmanager
def step_progress(progress: Progress | bool, run_id: str, metric: str) -> Iterator[Progress | None]:
    """The loop's progress callback: the caller's, a tqdm step bar (True) closed at the end, or None."""
    if not progress:
        yield None
        return
    if callable(progress):
        yield progress
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=f"train {run_id}", unit="step", dynamic_ncols=True, leave=False)

    def tick(step: int, total: int, value: float) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix_str(f"val {metric} {value:.4g}", refresh=False)

    try:
        yield tick
    finally:
        bar.close()


__all__ = ["RUN_FLAGS", "ResolvedRun", "RunConfig", "knn_graphs_cached", "resolve_run", "train_run"]


def train_run(store: FeatureStore, cfg: RunConfig, *, resolved: ResolvedRun | None = None,
              force: bool = False, progress: Progress | bool = False) -> dict[str, Any]:
    """Train (unless the identical run is done), evaluate on the test split, save; returns the metrics.

    progress: True shows a step bar (steps, the validation selection metric, ETA) on stderr; a callable is
    called as progress(step, max_steps, validation value) at every evaluation step instead."""
    registry = RunRegistry(store)
    run = resolved or resolve_run(store, cfg)
    rid = run.run_id
    if registry.is_done(rid) and not force:
        return {"run_id": rid, "skipped": True, **registry.metrics(rid)}
    subset, val = run.subset, run.val
    if subset is None or val is None:
        raise StratalignError(f"run {rid} was read back from its config: resolve_run gives the pairs train_run needs")
    v, t = run_entries(store, cfg)
    pairs = PairRows(np.concatenate([subset.image_rows, val.image_rows]),
                     np.concatenate([subset.caption_rows, val.caption_rows]))
    x_img = gather(v, run.vision_layer, pairs.image_rows)
    x_txt = gather(t, run.text_layer, pairs.caption_rows)
    train_idx = np.arange(len(subset))
    val_idx = np.arange(len(subset), len(pairs))
    train_cfg = run.train_config()
    objective = objective_named(run.objective)
    t0 = time.perf_counter()
    graphs, extra = None, {}
    if objective.knn_graphs:  # built once per subset, cached in the store
        graphs, hit = knn_graphs_cached(store, run, pairs.image_rows[train_idx], pairs.caption_rows[train_idx],
                                        x_img[train_idx], x_txt[train_idx], train_cfg.knn_k)
        extra = {"knn_graph_cached": hit}
    targets = validation_targets(store, cfg.dataset, val, t, run.text_layer)
    with step_progress(progress, rid, train_cfg.select if objective.training is Training.GRADIENT else "loss") as tick:
        model, summary = fit_objective(objective, x_img, x_txt, train_idx, val_idx, train_cfg, graphs=graphs,
                                       targets=targets, progress=tick)
    summary = {**summary, **extra}
    train_s = time.perf_counter() - t0
    labels = store.dataset(cfg.dataset).images["label"].to_numpy()[pairs.image_rows[train_idx]]
    metrics = {"run_id": rid, "train_seconds": round(train_s, 3), **summary}
    scored = score_model(store, run, model, cfg.dataset, train_features=(x_img[train_idx], x_txt[train_idx], labels))
    metrics.update(scored.metrics)
    tensors = {**model_tensors(model), **subset_tensors(subset)}
    registry.save(rid, run.config_dict(), tensors, metrics)
    save_run_queries(store, run, scored)  # after the done mark: a run without them recomputes them when compared
    return {"run_id": rid, "skipped": False, **metrics}


def knn_graphs_cached(store: FeatureStore, run: ResolvedRun, image_rows: np.ndarray,
                      caption_rows: np.ndarray, x_img: np.ndarray, x_txt: np.ndarray,
                      k: int) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """((image graph, text graph), came_from_cache) of the training pairs (store rows image_rows /
    caption_rows, features x_img / x_txt in the same order): read from graphs/ or built with FAISS and saved."""
    key = G.graph_key(run.vision_entry, run.vision_layer, run.text_entry, run.text_layer, image_rows,
                      caption_rows, k)
    meta = {"vision_entry": run.vision_entry, "text_entry": run.text_entry,
            "vision_layer": str(run.vision_layer), "text_layer": str(run.text_layer),
            "n_train": str(len(image_rows)), "k": str(k)}
    return G.cached_graphs(store, key, len(image_rows),
                           lambda: knn_graphs(x_img, x_txt, np.arange(len(x_img)), k), meta)
