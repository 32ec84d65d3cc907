"""Stage 3 runner: resolve a run, gather its cached features, train, evaluate, save the run.

Never loads an encoder: features come from the store (zero-shot prompts from the prompt cache that
`extract` fills). A run is content-addressed by its fully resolved config (see run_config and store.runs).
How a model is trained and scored comes from its objective's registry entry (core.objectives).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from stratalign.core.objectives import Training, objective_named
from stratalign.errors import StratalignError
from stratalign.progress import progress_bar
from stratalign.stages.runs.config import (
    RUN_FLAGS,
    ResolvedRun,
    RunConfig,
    RunInputs,
    inputs_of,
    preset_notes,
    resolve_run,
)
from stratalign.stages.runs.data import gather, run_unpaired, subset_tensors, unpaired_features, validation_targets
from stratalign.stages.runs.evaluate import save_run_queries, score_model, score_saved_run
from stratalign.stages.runs.results import RunResult
from stratalign.stages.subsets import PairRows
from stratalign.store import graphs as graphs_mod
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import TEST_SCORED, RunRegistry, lacks_test_scores
from stratalign.train import RunSpec, TrainConfig, TrainResult, fit_objective, knn_graphs, model_tensors, train_many
from stratalign.train.cohorts import Cohort, derived_result, same_run_but_stop
from stratalign.train.rules import Progress
from stratalign.train.validation import ValidationTargets


@contextmanager
def step_progress(progress: Progress | bool, run_id: str, metric: str) -> Iterator[Progress | None]:
    """The loop's progress callback: the caller's, a tqdm step bar (True) closed at the end, or None."""
    if not progress:
        yield None
        return
    if callable(progress):
        yield progress
        return
    bar = progress_bar(total=None, desc=f"train {run_id}", unit="step", dynamic_ncols=True, leave=False)

    def tick(step: int, total: int, value: float) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix_str(f"val {metric} {value:.4g}", refresh=False)

    try:
        yield tick
    finally:
        bar.close()


__all__ = ["RUN_FLAGS", "ResolvedRun", "RunConfig", "RunResult", "knn_graphs_cached", "resolve_run",
           "save_derived_final", "train_run", "train_runs"]


@dataclass
class _Prepared:
    """A run to train: its resolution, pairs (training then validation) and what fitting needs."""

    cfg: RunConfig
    run: ResolvedRun
    pairs: PairRows
    n_train: int
    targets: ValidationTargets
    train_cfg: TrainConfig
    inputs: RunInputs  # its dataset and entries, as resolution found them
    unpaired: tuple[np.ndarray, np.ndarray] | None = None  # (image rows, caption rows) for its R_S batches (§ 3.11)
    cohort: Cohort | None = None  # the seeds of its grid point (train.cohorts)
    test: bool = True  # scored on the test split when saved (a selection run is not: docs/method.md § 3.9)

    @property
    def features_key(self) -> tuple:
        """Runs with one key read the same two feature layers (one table pair for all of them)."""
        return self.run.vision_entry, self.run.vision_layer, self.run.text_entry, self.run.text_layer


def train_run(store: FeatureStore, cfg: RunConfig, *, resolved: ResolvedRun | None = None,
              force: bool = False, progress: Progress | bool = False) -> RunResult:
    """Train (unless the identical run is done), evaluate on the test split, save; returns the run's result (its
    id, whether it was skipped, its metrics; it reads as the dict of them).

    progress: True shows a step bar (steps, the validation selection metric, ETA) on stderr; a callable is
    called as progress(step, max_steps, validation value) at every evaluation step instead."""
    return train_runs(store, [cfg], resolved=None if resolved is None else [resolved], force=force,
                      progress=progress)[0]


def train_runs(store: FeatureStore, cfgs: list[RunConfig], *, resolved: list[ResolvedRun] | None = None,
               force: bool = False, progress: Progress | bool = False,
               cohorts: list[Cohort | None] | None = None, test: list[bool] | None = None) -> list[RunResult]:
    """Train every run not yet done (one training for a run asked for twice), evaluate and save each; their
    results in `cfgs` order. Runs of aligned heads that read the same feature layers train together in batched
    groups (train.train_many: the numbers each would get alone); CoMM and CSA runs are fitted one by one.

    progress: True shows a bar (one run: its steps and validation metric; many: steps of all runs, runs done,
    ETA); a callable gets (step, max_steps, value) of a single run's evaluations.
    cohorts: per config, the seeds of its grid point (train.cohorts): a run trained here whose whole cohort trained in
    one stack holds, in `RunResult.trained`, its weights at the cohort's best step (`save_derived_final`).
    test: per config, whether it is scored on the test split (default: every run). A selection run is not (the test
    split sees only the chosen models): its metrics say `test_scored: false`, and a later call that asks for its test
    scores scores the saved weights then."""
    registry = RunRegistry(store)
    runs = resolved or [resolve_run(store, c) for c in cfgs]  # a bad setting fails here, before any training
    for line in preset_notes(cfgs):  # the schedule in force, said from Python as from the CLI
        print(line, file=sys.stderr, flush=True)
    todo: dict[str, tuple[RunConfig, ResolvedRun, Cohort | None]] = {}
    scores: dict[str, bool] = {}  # run id -> scored on the test split (asked for by any of its configs)
    done: dict[str, dict[str, Any]] = {}  # the metrics of the runs already in the store, read once
    for cfg, run, cohort, scored in zip(cfgs, runs, cohorts or [None] * len(cfgs), test or [True] * len(cfgs)):
        rid = run.run_id
        scores[rid] = scores.get(rid, False) or scored
        if rid in todo or rid in done:
            continue
        if force or not registry.is_done(rid):
            todo[rid] = (cfg, run, cohort)
        else:
            done[rid] = registry.metrics(rid)
    if todo:  # before gathering anything: the runs are saved at the end
        store.require_writable(f"training {len(todo)} run(s)")
    for parts in [("graphs",), *(("runs", rid) for rid in todo)]:  # a write through a link: refused before training
        store.loc.refuse_links(*parts)
    targets: dict[tuple, ValidationTargets] = {}
    prepared = [_prepare(store, cfg, run, targets, cohort, scores[rid]) for rid, (cfg, run, cohort) in todo.items()]
    kept = _train_prepared(store, registry, prepared, progress)
    for rid, metrics in done.items():
        if scores[rid] and lacks_test_scores(metrics):  # saved as a selection run, asked for now as a chosen one
            score_saved_run(store, rid)
            done[rid] = registry.metrics(rid)
    return [RunResult(run.run_id, run.run_id not in todo,
                      done[run.run_id] if run.run_id in done else registry.metrics(run.run_id), kept.get(run.run_id))
            for run in runs]


def _prepare(store: FeatureStore, cfg: RunConfig, run: ResolvedRun,
             targets: dict[tuple, ValidationTargets], cohort: Cohort | None = None, test: bool = True) -> _Prepared:
    """The run's pairs and validation targets (one targets object for the runs that share them: they are scored
    on validation together)."""
    subset, val = run.subset, run.val
    if subset is None or val is None:
        raise StratalignError(f"run {run.run_id} was read back from its config: resolve_run gives the pairs training "
                              "needs")
    pairs = PairRows(np.concatenate([subset.image_rows, val.image_rows]),
                     np.concatenate([subset.caption_rows, val.caption_rows]))
    inputs = inputs_of(store, run)
    key = (cfg.dataset, run.text_entry, run.text_layer, val.image_rows.tobytes(), val.caption_rows.tobytes())
    if key not in targets:
        targets[key] = validation_targets(inputs.dataset, val, inputs.text, run.text_layer)
    train_cfg = run.train_config()
    return _Prepared(cfg, run, pairs, len(subset), targets[key], train_cfg, inputs,
                     run_unpaired(run, inputs, train_cfg.unpaired_from) if train_cfg.unpaired else None, cohort, test)


def _train_prepared(store: FeatureStore, registry: RunRegistry, prepared: list[_Prepared],
                    progress: Progress | bool) -> dict[str, TrainResult]:
    """Fit every prepared run (batched where it can), then score and save each as it comes; the results of the runs
    that hold their cohort's weights (train.cohorts), by run id."""
    single = len(prepared) == 1
    bar = None if single or not progress else _group_bar(len(prepared))
    kept: dict[str, TrainResult] = {}
    try:
        by_features: dict[tuple, list[_Prepared]] = {}
        for p in prepared:
            by_features.setdefault(p.features_key, []).append(p)
        for group in by_features.values():
            _train_group(store, registry, group, progress if single else None, bar, kept)
    finally:
        if bar is not None:
            bar.close()
    return kept


def _group_bar(n_runs: int) -> Any:
    return progress_bar(total=None, desc=f"train {n_runs} runs", unit="step", dynamic_ncols=True)


def _train_group(store: FeatureStore, registry: RunRegistry, group: list[_Prepared], progress: Progress | bool | None,
                 bar: Any, kept: dict[str, TrainResult]) -> None:
    """The runs of one feature-layer pair: one table of their pairs' features, aligned heads batched."""
    first = group[0]
    v, t = first.inputs.vision, first.inputs.text
    both = np.stack([np.concatenate([p.pairs.image_rows for p in group]),
                     np.concatenate([p.pairs.caption_rows for p in group])], 1)
    union, where = np.unique(both, axis=0, return_inverse=True)
    where = where.reshape(-1)
    x_img = gather(v, first.run.vision_layer, union[:, 0])
    x_txt = gather(t, first.run.text_layer, union[:, 1])
    starts = np.cumsum([0] + [len(p.pairs) for p in group])
    positions = [where[a:b] for a, b in zip(starts[:-1], starts[1:])]
    labels = first.inputs.dataset.images["label"].to_numpy()
    heads, others = [], []
    for p, pos in zip(group, positions):
        (heads if objective_named(p.run.objective).training is Training.GRADIENT else others).append((p, pos))
    tables, pools = unpaired_features([p for p, _ in heads], first.run.vision_layer, first.run.text_layer)
    specs, extras = [], []
    for (p, pos), pool in zip(heads, pools):
        tr, va = pos[:p.n_train], pos[p.n_train:]
        graphs, extra = None, {}
        if objective_named(p.run.objective).knn_graphs:  # built once per subset, cached in the store
            graphs, hit = knn_graphs_cached(store, p.run, p.pairs.image_rows[:p.n_train],
                                            p.pairs.caption_rows[:p.n_train], x_img[tr], x_txt[tr], p.train_cfg.knn_k)
            extra = {"knn_graph_cached": hit}
        if pool is not None:
            extra = {"unpaired_rows": {"images": len(pool[0]), "captions": len(pool[1])}}
        specs.append(RunSpec(p.train_cfg, tr, va, graphs, p.targets, unpaired=pool, cohort=p.cohort))
        extras.append(extra)
    if specs:
        results = _fit_heads(x_img, x_txt, specs, heads[0][0], progress, bar, tables)
        for (p, pos), res, extra in zip(heads, results, extras):
            summary = {**res.summary(), "train_loop_seconds": round(res.seconds, 3), **extra}
            rows = pos[:p.n_train]
            _save(store, registry, p, res.model, summary, res.seconds, lambda r=rows: x_img[r], lambda r=rows: x_txt[r],
                  labels)
            if res.checkpoint is not None:
                kept[p.run.run_id] = res
    # runs on one subset with one ridge side by side: a CSA k grid then decomposes once (train.fit._CsaBases)
    others.sort(key=lambda item: (item[0].run.objective, item[0].n_train, item[0].pairs.image_rows.tobytes(),
                                  item[0].pairs.caption_rows.tobytes(), item[0].train_cfg.csa_ridge))
    for p, pos in others:
        tr, va = pos[:p.n_train], pos[p.n_train:]
        t0 = time.perf_counter()
        with step_progress(progress or False, p.run.run_id, "loss") as tick:  # many runs: the group bar instead
            model, summary = fit_objective(objective_named(p.run.objective), x_img, x_txt, tr, va, p.train_cfg,
                                           targets=p.targets, progress=tick)
        _save(store, registry, p, model, summary, time.perf_counter() - t0, lambda r=tr: x_img[r],
              lambda r=tr: x_txt[r], labels)
        if bar is not None:
            bar.set_postfix_str(f"fitted {p.run.run_id}")


def _fit_heads(x_img: np.ndarray, x_txt: np.ndarray, specs: list[RunSpec], first: _Prepared,
               progress: Progress | bool | None, bar: Any,
               unpaired: tuple[np.ndarray, np.ndarray] | None = None) -> list[TrainResult]:
    """train_many with the progress asked for: a single run's step bar, or the group bar's steps and runs."""
    if bar is None:
        with step_progress(progress or False, first.run.run_id, first.train_cfg.select) as tick:
            specs[0].progress = tick
            return train_many(x_img, x_txt, specs, unpaired=unpaired)
    base = bar.n

    def on_step(done: int, planned: int, finished: int, runs: int) -> None:
        bar.total = base + planned
        bar.update(base + done - bar.n)
        bar.set_postfix_str(f"runs done {finished}/{runs}", refresh=False)

    return train_many(x_img, x_txt, specs, on_step=on_step, unpaired=unpaired)


def _save(store: FeatureStore, registry: RunRegistry, p: _Prepared, model: Any, summary: dict[str, Any],
          seconds: float, x_train_img: Callable[[], np.ndarray], x_train_txt: Callable[[], np.ndarray],
          all_labels: np.ndarray) -> None:
    """Score the fitted model on the test split (unless it is a selection run) and save the run (weights, training
    rows, metrics, queries)."""
    rid = p.run.run_id
    subset = PairRows(p.pairs.image_rows[:p.n_train], p.pairs.caption_rows[:p.n_train])
    metrics = {"run_id": rid, "train_seconds": round(seconds, 3), **summary}
    if not p.test:
        metrics[TEST_SCORED] = False
        registry.save(rid, p.run.config_dict(), {**model_tensors(model), **subset_tensors(subset)}, metrics)
        return
    train_features = None  # only an objective scored by a probe reads them (a copy of the training rows)
    if objective_named(p.run.objective).evaluation.needs_train_features:
        train_features = (x_train_img(), x_train_txt(), all_labels[subset.image_rows])
    scored = score_model(store, p.run, model, train_features=train_features, inputs=p.inputs)
    metrics.update(scored.metrics)
    registry.save(rid, p.run.config_dict(), {**model_tensors(model), **subset_tensors(subset)}, metrics)
    save_run_queries(store, p.run, scored)  # after the done mark: a run without them recomputes them when compared


def save_derived_final(store: FeatureStore, cfg: RunConfig, selection: RunResult, *, force: bool = False,
                       targets: dict[tuple, ValidationTargets] | None = None) -> RunResult | None:
    """The final run `cfg` (its selection run's config with the cell's stop_step) from the weights the selection run
    kept at that step (train.cohorts): the same trajectory, so the same weights as training it again; scored and saved
    as a trained run, its metrics say `derived_from`. None where the kept weights cannot stand for it (another step,
    another config): then it is trained. `targets`: validation targets already built, shared as train_runs shares
    them (filled here)."""
    registry = RunRegistry(store)
    run = resolve_run(store, cfg)
    if not force and registry.is_done(run.run_id):
        return RunResult(run.run_id, True, registry.metrics(run.run_id))
    res = selection.trained
    if res is None or res.checkpoint is None or res.checkpoint.step == 0:
        return None
    p = _prepare(store, cfg, run, {} if targets is None else targets)
    if p.train_cfg.stop_step != res.checkpoint.step or not same_run_but_stop(res.config, p.train_cfg):
        return None
    store.require_writable(f"saving run {run.run_id}")
    store.loc.refuse_links("runs", run.run_id)
    final = derived_result(res, p.train_cfg, res.checkpoint, source=selection.run_id)
    summary = {**final.summary(), "train_loop_seconds": 0.0, "derived_from": selection.run_id}
    rows = PairRows(p.pairs.image_rows[:p.n_train], p.pairs.caption_rows[:p.n_train])
    _save(store, registry, p, final.model, summary, final.seconds,
          lambda: gather(p.inputs.vision, run.vision_layer, rows.image_rows),
          lambda: gather(p.inputs.text, run.text_layer, rows.caption_rows),
          p.inputs.dataset.images["label"].to_numpy())
    return RunResult(run.run_id, False, registry.metrics(run.run_id))


def knn_graphs_cached(store: FeatureStore, run: ResolvedRun, image_rows: np.ndarray,
                      caption_rows: np.ndarray, x_img: np.ndarray, x_txt: np.ndarray,
                      k: int) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """((image graph, text graph), came_from_cache) of the training pairs (store rows image_rows /
    caption_rows, features x_img / x_txt in the same order): read from graphs/ or built with FAISS and saved."""
    key = graphs_mod.graph_key(run.vision_entry, run.vision_layer, run.text_entry, run.text_layer, image_rows,
                      caption_rows, k)
    meta = {"vision_entry": run.vision_entry, "text_entry": run.text_entry,
            "vision_layer": str(run.vision_layer), "text_layer": str(run.text_layer),
            "n_train": str(len(image_rows)), "k": str(k)}
    return graphs_mod.cached_graphs(store, key, len(image_rows),
                           lambda: knn_graphs(x_img, x_txt, np.arange(len(x_img)), k), meta)
