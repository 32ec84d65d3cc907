"""What `stratalign runs ls | show | rm` print and do: the trained runs of a store, one row each, with their encoders,
layers, objective, the training settings that differ from TrainConfig's defaults, the selection score and the
training time; one run's resolved config and metrics; removing a run."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from stratalign.core.metric_registry import RUNS, shown_in
from stratalign.errors import StratalignError
from stratalign.store import inventory
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry, lacks_test_scores

LISTED = shown_in(RUNS)  # the registry's metrics of `runs ls` (core.metric_registry)
COLUMNS = ("run", "dataset", "vision", "text", "layers", "objective", "head", "n_pairs", "seed", "precision",
           "overrides", "selection", "best_step", *LISTED, "seconds")


def train_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The run's training settings that differ from what its preset gives (TrainConfig's defaults under the
    preset's schedule; the defaults alone for a run without a preset) for its objective, head and seed: the
    --set values, not the preset's own schedule repeated on every run; {} when the defaults cannot be rebuilt."""
    from stratalign.train.config import TrainConfig
    from stratalign.train.presets import PRESETS

    train = config.get("train") or {}
    preset = PRESETS.get(str(config.get("preset")))
    schedule = preset.settings() if preset is not None else {}
    try:
        defaults = TrainConfig(objective=train["objective"], head=train["head"], seed=train["seed"],
                               **schedule).to_dict()
    except (KeyError, TypeError, StratalignError):
        return {}
    return {k: v for k, v in train.items() if k in defaults and json.dumps(defaults[k]) != json.dumps(v)}


def _selection(metrics: dict[str, Any]) -> str:
    """How the checkpoint was chosen: the recorded `selection` (metric and its value) where the run has one, else
    the validation score(s) older runs recorded (`best_val_*`)."""
    sel = metrics.get("selection")
    if isinstance(sel, dict) and sel.get("metric"):
        value = sel.get("value")
        return f"{sel['metric']}={value:.3g}" if isinstance(value, (int, float)) else str(sel["metric"])
    picked = {k[len("best_val_"):]: v for k, v in metrics.items() if k.startswith("best_val_") and isinstance(v, (int, float))}
    return ", ".join(f"{k}={v:.3g}" for k, v in sorted(picked.items()))


def runs_table(store: FeatureStore, dataset: str | None = None, objective: str | None = None) -> pl.DataFrame:
    """One row per finished run (filtered by dataset and objective when given), COLUMNS in order."""
    reg = RunRegistry(store)
    rows = []
    for rid in reg.ids():
        if not reg.is_done(rid):
            continue
        cfg, met = reg.config(rid), reg.metrics(rid)
        if (dataset and cfg.get("dataset") != dataset) or (objective and cfg.get("objective") != objective):
            continue
        over = train_overrides(cfg)
        rows.append({
            "run": rid, "dataset": cfg.get("dataset"), "vision": cfg.get("vision"), "text": cfg.get("text"),
            "layers": f"{cfg.get('vision_layer')},{cfg.get('text_layer')}", "objective": cfg.get("objective"),
            "head": cfg.get("head"), "n_pairs": cfg.get("n_pairs"), "seed": cfg.get("seed"),
            "precision": (cfg.get("train") or {}).get("precision", "fp32"),  # older runs: fp32 (METHOD 3.6)
            "overrides": " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(over.items())),
            "selection": _selection(met), "best_step": met.get("best_step"),
            **{k: met.get(k) for k in LISTED}, "seconds": met.get("train_seconds"),
        })
    if not rows:
        return pl.DataFrame()
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return frame.select([c for c in COLUMNS if c in frame.columns and frame[c].null_count() < frame.height])


def show_run(store: FeatureStore, run: str) -> dict[str, Any]:
    """A run (full id or unique prefix): its resolved config, its metrics (None if unfinished), its files and sizes."""
    reg = RunRegistry(store)
    rid = reg.resolve(run)
    return {"run": rid, "config": reg.config(rid), "metrics": reg.metrics(rid) if reg.is_done(rid) else None,
            "overrides": train_overrides(reg.config(rid)),
            "files": [(n, store.loc.size("runs", rid, n)) for n in store.loc.listdir("runs", rid)]}


def show_lines(shown: dict[str, Any]) -> list[str]:
    """`runs show` for a person: a few lines (what it trained on, the checkpoint, test metrics, files)."""
    cfg, met = shown["config"], shown["metrics"]
    lines = [f"run {shown['run']}",
             f"  {'data':<11}{cfg.get('dataset')}: {cfg.get('n_pairs') or 'all'} training pairs, seed {cfg.get('seed')}",
             f"  {'encoders':<11}{cfg.get('vision')} layer {cfg.get('vision_layer')}, {cfg.get('text')} layer "
             f"{cfg.get('text_layer')}",
             f"  {'training':<11}{cfg.get('objective')}, {cfg.get('head')} head"
             + ("; " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(shown["overrides"].items()))
                if shown["overrides"] else "")]
    if met is None:
        lines.append("  not finished (no metrics.json)")
    else:
        lines.append(f"  {'checkpoint':<11}step {met.get('best_step')} by {_selection(met) or '?'}"
                     + (f", stopped: {met['stopped_reason']}" if met.get("stopped_reason") else "")
                     + (f", {met['train_seconds']:.1f} s" if isinstance(met.get("train_seconds"), (int, float)) else ""))
        test = [f"{k} {met[k]:.2f}" for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                                                "zs_top1", "probe_acc", "alignment_mknn")
                if isinstance(met.get(k), (int, float))]
        if test:
            lines.append(f"  {'test':<11}" + ", ".join(test))
        elif lacks_test_scores(met):
            lines.append(f"  {'test':<11}not scored: a selection run (the test split sees only the chosen models; "
                         "`stratalign eval` scores it)")
    lines.append(f"  {'files':<11}" + ", ".join(f"{name} ({size:,} bytes)" for name, size in shown["files"]))
    lines.append("  (`stratalign runs show --json` prints the whole config and metrics)")
    return lines


def remove_run(store: FeatureStore, run: str) -> str:
    """Remove a run's folder (weights, metrics, evals, per-query results); returns its id."""
    rid = RunRegistry(store).resolve(run)
    inventory.remove(store, inventory.find(store, "run", rid))
    return rid
