"""Stage 3 runner: resolve a run, gather its cached features, train, evaluate, save the run.

Never loads an encoder: features come from the store (zero-shot prompts from the prompt cache that
`extract` fills). A run is content-addressed by its fully resolved config (see run_config and store.runs).
How a model is trained and scored comes from its objective's registry entry (core.objectives).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from stratalign.core.objectives import Training, objective_named
from stratalign.errors import StratalignError
from stratalign.stages.evaluate import evaluate_model
from stratalign.stages.run_config import RUN_FLAGS, ResolvedRun, RunConfig, resolve_run
from stratalign.stages.run_data import LayerCache, gather, subset_tensors
from stratalign.stages.subsets import PairRows
from stratalign.store import graphs as G
from stratalign.store.features import FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.train import RunSpec, fit_objective, knn_graphs, model_tensors, train_many

GROUP_SIZE = "train_group_size"

__all__ = ["RUN_FLAGS", "ResolvedRun", "RunConfig", "knn_graphs_cached", "resolve_run", "train_run", "train_runs"]


def train_run(store: FeatureStore, cfg: RunConfig, *, resolved: ResolvedRun | None = None,
              force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train (unless the identical run is done), evaluate on the test split, save; returns the metrics.
    One run of `train_runs` (the same code a sweep uses for many)."""
    registry = RunRegistry(store)
    run = resolved or resolve_run(store, cfg)
    if registry.is_done(run.run_id) and not force:
        return {"run_id": run.run_id, "skipped": True, **registry.metrics(run.run_id)}
    return {"skipped": False, **train_runs(store, [run], progress=progress)[0]}


@dataclass
class _Prepared:
    """A run's place in the batched call: its pairs, rows of its feature source, graphs, graph time."""

    run: ResolvedRun
    pairs: PairRows
    source: int
    rows: np.ndarray  # positions of the run's pairs (train, then val) in its source's tables
    graphs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _sources(store: FeatureStore, runs: list[ResolvedRun], cache: LayerCache) -> tuple[list, list[_Prepared]]:
    """Feature tables per (entries, layers): the union of the runs' pairs, each layer read once."""
    keyed: dict[tuple, list[tuple[ResolvedRun, PairRows]]] = {}
    for run in runs:
        if run.subset is None or run.val is None:
            raise StratalignError(f"run {run.run_id} was read back from its config: resolve_run gives the pairs "
                                  "train_run needs")
        pairs = PairRows(np.concatenate([run.subset.image_rows, run.val.image_rows]),
                         np.concatenate([run.subset.caption_rows, run.val.caption_rows]))
        key = (run.vision_entry, run.vision_layer, run.text_entry, run.text_layer)
        keyed.setdefault(key, []).append((run, pairs))
    sources, prepared = [], []
    for (ve, vl, te, tl), members in keyed.items():
        both = np.unique(np.concatenate([np.stack([p.image_rows, p.caption_rows], 1) for _, p in members]), axis=0)
        x_img = gather(store.entry(ve), vl, both[:, 0], cache)
        x_txt = gather(store.entry(te), tl, both[:, 1], cache)
        code = both[:, 0] * (both[:, 1].max() + 1) + both[:, 1]  # sorted, as np.unique sorts rows
        for run, pairs in members:
            rows = np.searchsorted(code, pairs.image_rows * (both[:, 1].max() + 1) + pairs.caption_rows)
            prepared.append(_Prepared(run, pairs, len(sources), rows))
        sources.append((x_img, x_txt))
    order = {r.run_id: i for i, r in enumerate(runs)}
    return sources, sorted(prepared, key=lambda p: order[p.run.run_id])


def train_runs(store: FeatureStore, runs: list[ResolvedRun], *, progress: bool = False,
               cache: LayerCache | None = None,
               on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train, evaluate and save resolved runs together: features gathered once per (entry, layer),
    runs that can share a loop trained batched (`train.train_many`), closed-form fits one by one.
    train_seconds of a batched run is its group's loop time divided by the runs in the group (its share)
    plus its own kNN-graph time; the returned metrics' `train_group_size` (not saved) says how many runs
    shared the loop."""
    cache = cache or LayerCache()
    sources, prepared = _sources(store, runs, cache)
    for p in prepared:
        n = p.run.n_train
        if objective_named(p.run.objective).knn_graphs:  # built once per subset, cached in the store
            t0 = time.perf_counter()
            x_img, x_txt = sources[p.source]
            p.graphs, hit = knn_graphs_cached(store, p.run, p.pairs.image_rows[:n], p.pairs.caption_rows[:n],
                                              x_img[p.rows[:n]], x_txt[p.rows[:n]], p.run.train_config().knn_k)
            p.extra = {"knn_graph_cached": hit, "_graph_seconds": time.perf_counter() - t0}
    fitted = _fit(sources, prepared, progress)
    out = []
    for p, (model, summary, seconds) in zip(prepared, fitted):
        run, n = p.run, p.run.n_train
        extra = dict(p.extra)
        seconds += extra.pop("_graph_seconds", 0.0)
        x_img, x_txt = sources[p.source]
        labels = store.dataset(run.dataset).images["label"].to_numpy()[p.pairs.image_rows[:n]]
        metrics = {"run_id": run.run_id, "train_seconds": round(seconds, 3), **summary, **extra}
        metrics.update(evaluate_model(store, run, model, run.dataset, cache=cache,
                                      train_features=(x_img[p.rows[:n]], x_txt[p.rows[:n]], labels)))
        tensors = {**model_tensors(model), **subset_tensors(run.subset)}
        group = metrics.pop(GROUP_SIZE, 1)  # not in metrics.json: its keys stay those of older stores
        RunRegistry(store).save(run.run_id, run.config_dict(), tensors, metrics)
        metrics = {**metrics, GROUP_SIZE: group}
        out.append(metrics)
        if on_done:
            on_done(metrics)
    return out


def _fit(sources: list, prepared: list[_Prepared], progress: bool) -> list[tuple[Any, dict[str, Any], float]]:
    """(model, summary, seconds) per run: gradient objectives through train_many, the others one by one."""
    out: list[Any] = [None] * len(prepared)
    many = [i for i, p in enumerate(prepared) if objective_named(p.run.objective).training is not Training.CLOSED_FORM]
    specs = [RunSpec(prepared[i].run.train_config(), prepared[i].rows[:prepared[i].run.n_train],
                     prepared[i].rows[prepared[i].run.n_train:], prepared[i].source, prepared[i].graphs) for i in many]
    for i, res in zip(many, train_many(sources, specs, progress=progress)):
        out[i] = (res.model, {**res.summary(), "train_loop_seconds": round(res.seconds, 3),
                              GROUP_SIZE: res.group_size}, res.seconds)
    for i, p in enumerate(prepared):
        if out[i] is None:
            t0 = time.perf_counter()
            x_img, x_txt = sources[p.source]
            n = p.run.n_train
            model, summary = fit_objective(objective_named(p.run.objective), x_img, x_txt, p.rows[:n], p.rows[n:],
                                           p.run.train_config())
            out[i] = (model, summary, time.perf_counter() - t0)
    return out


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
