"""`stratalign train | eval | runs | sweep | demo`: stage 3 and the main job."""

from __future__ import annotations

import json
from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url
from stratalign.errors import StratalignError
from stratalign.store.features import FeatureStore
from stratalign.store.runs import RunRegistry


def _options(pairs: list[str]) -> tuple:
    """--set key=value training overrides (values parsed as JSON when they can be)."""
    out = []
    for item in pairs:
        if "=" not in item:
            raise StratalignError(f"--set takes key=value, not {item!r}")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), json.loads(v)))
        except json.JSONDecodeError:
            out.append((k.strip(), v))
    return tuple(out)


def _n_pairs(value: Optional[str]) -> Optional[int]:
    if value in (None, "all"):
        return None
    try:
        return int(value)
    except ValueError:
        raise StratalignError(f"--n-pairs takes an integer or 'all', not {value!r}") from None


def train_cmd(
    dataset: str = typer.Option(..., help="Dataset with extracted features."),
    vision: str = typer.Option(..., help="Vision encoder spec."),
    text: str = typer.Option(..., help="Text encoder spec."),
    layers: str = typer.Option("auto", help="auto (recorded by `layers --choose`), last, or V,T."),
    head: str = typer.Option("linear", help="linear | mlp | residual | csa."),
    objective: str = typer.Option("clip", help="clip | clip+structure | clip+structure-knn | clip+ib | clip+vib | comm | csa."),
    n_pairs: Optional[str] = typer.Option(None, help="Training pairs drawn from the train split (default all)."),
    seed: int = typer.Option(0, help="Seed of the subset, the validation carve-out and the initialisation."),
    ids: Optional[str] = typer.Option(None, help="File of caption ids (one per line) to train on instead."),
    ids_kind: str = typer.Option("caption", help="What --ids lists: caption or image ids."),
    set_: list[str] = typer.Option([], "--set", help="Trainer override key=value (e.g. max_steps=500, lam=5)."),
    force: bool = typer.Option(False, help="Train again even if the identical run is in the store."),
    store: Optional[str] = StoreOption,
) -> None:
    """Train alignment heads on cached features, evaluate on the test split, save the run."""
    from stratalign.stages.train import RunConfig, train_run

    fs = FeatureStore.open(store_url(store), "a")
    cfg = RunConfig(dataset=dataset, vision=vision, text=text, layers=layers, head=head, objective=objective,
                    n_pairs=_n_pairs(n_pairs), seed=seed, ids_file=ids, ids_kind=ids_kind, options=_options(set_))
    res = train_run(fs, cfg, force=force)
    verb = "already in the store" if res.get("skipped") else f"trained in {res.get('train_seconds', 0):.2f}s"
    console.print(f"run {res['run_id']} ({verb})")
    _print_metrics(res)


def _print_metrics(res: dict) -> None:
    """Headline metrics, then how the checkpoint was chosen (the trainer's message, warm-up warnings)."""
    keys = [k for k in ("best_step", "lambda_at_best", "stopped_reason", "i2t_R@1", "i2t_R@5", "i2t_R@10",
                        "t2i_R@1", "t2i_R@5", "t2i_R@10", "zs_top1", "zs_top5", "zs_balanced_acc", "alignment_mknn",
                        "probe_acc", "probe_f1_macro") if k in res]
    console.print("  " + "  ".join(f"{k}={res[k]:.2f}" if isinstance(res[k], float) else f"{k}={res[k]}" for k in keys))
    if res.get("message"):
        console.print(f"  {res['message']}", highlight=False, markup=False, soft_wrap=True)
    if res.get("restored_before_warmup"):
        console.print("  restored_before_warmup=True: the restored heads are from inside the lambda warm-up "
                      "(the regulariser was not at full strength)", highlight=False, soft_wrap=True)
    for name in ("probe_baselines",):
        if name in res:
            console.print(f"  {name}: {res[name]}")


def eval_cmd(
    run: str = typer.Option(..., help="Run id (or a unique prefix; see `stratalign runs ls`)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluate on another dataset's test split (same encoders)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Re-load a run's heads and evaluate retrieval and zero-shot classification (FAISS search)."""
    from stratalign.stages.evaluate import evaluate_saved_run

    fs = FeatureStore.open(store_url(store), "a")
    registry = RunRegistry(fs)
    rid = registry.resolve(run)
    res = evaluate_saved_run(fs, rid, dataset)
    console.print(f"run {rid} on {dataset or 'its own dataset'} (test split)")
    _print_metrics(res)


def runs_ls(store: Optional[str] = StoreOption) -> None:
    """Table of finished runs with their headline metrics."""
    fs = FeatureStore.open(store_url(store), "r")
    table = RunRegistry(fs).table()
    if table.height == 0:
        console.print(f"no runs in {fs.url}")
        return
    cols = [c for c in ("run", "dataset", "objective", "head", "layer_rule", "vision_layer", "text_layer", "n_pairs",
                        "seed", "best_step", "lambda_at_best", "i2t_R@1", "t2i_R@1", "zs_top1") if c in table.columns]
    print_table(table.select(cols), title=f"runs in {fs.url}")


def _rule_objective(value: str) -> tuple[str, str]:
    rule, sep, objective = value.partition(":")
    if not sep or not rule or not objective:
        raise StratalignError(f"--skip takes RULE:OBJECTIVE (e.g. last:clip+structure-knn), not {value!r}")
    return rule, objective


def _ints(values: list[str]) -> tuple:
    return tuple(_n_pairs(v) for v in values)


def sweep_cmd(
    dataset: str = typer.Option(..., help="Dataset with extracted features."),
    vision: str = typer.Option(...),
    text: str = typer.Option(...),
    n_pairs: list[str] = typer.Option(["all"], "--n-pairs", help="Repeat: subset sizes ('all' = whole train pool)."),
    seed: list[int] = typer.Option([0, 1, 2], "--seed", help="Repeat: seeds."),
    objective: list[str] = typer.Option(["clip", "clip+structure"], "--objective", help="Repeat: objectives."),
    layers: list[str] = typer.Option(["last", "auto"], "--layers", help="Repeat: last, auto, or V,T."),
    head: list[str] = typer.Option(["linear"], "--head", help="Repeat: heads."),
    skip: list[str] = typer.Option([], "--skip", help="Repeat: RULE:OBJECTIVE cells to leave out (last:comm)."),
    set_: list[str] = typer.Option([], "--set", help="Trainer override key=value for every cell."),
    out: str = typer.Option("stratalign-report", help="Folder for leaderboard.parquet/.csv and the plots."),
    store: Optional[str] = StoreOption,
) -> None:
    """Run every cell of the grid not yet in the store; write the leaderboard and plots."""
    from stratalign.report.report import results_table
    from stratalign.stages.sweep import SweepConfig, run_sweep
    from stratalign.stages.train import RunConfig

    fs = FeatureStore.open(store_url(store), "a")
    cfg = SweepConfig(base=RunConfig(dataset=dataset, vision=vision, text=text, options=_options(set_)),
                      n_pairs=_ints(n_pairs), seeds=tuple(seed), objectives=tuple(objective),
                      layer_rules=tuple(layers), heads=tuple(head), skip=tuple(_rule_objective(v) for v in skip))
    res = run_sweep(fs, cfg, out)
    console.print(f"{res.trained} run(s) trained, {res.skipped} already in the store")
    print_table(results_table(res.leaderboard), title="leaderboard (test split, mean ± std over seeds)")
    console.print("files: " + ", ".join(v for k, v in res.files.items() if k != "plot_seconds"))


def demo_cmd(
    out: str = typer.Option("stratalign-report", help="Report folder (report.md, PNGs, leaderboard)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N emoji (a quick look)."),
    seeds: int = typer.Option(3, help="Seeds per cell."),
    store: Optional[str] = StoreOption,
) -> None:
    """The main job on the embedded default: Twemoji, 3 packaged encoders, layer choice, sweep, report."""
    from stratalign.stages.demo import DemoConfig, run_demo

    cfg = DemoConfig(limit=limit, seeds=tuple(range(seeds)))
    if limit is not None and limit < 300:
        cfg = DemoConfig(limit=limit, seeds=tuple(range(seeds)), n_pairs=(max(10, limit // 8), None))
    res = run_demo(store_url(store), out, cfg, log=console.print)
    print_table(res["table"], title="demo results (test split, mean ± std over seeds)")
    console.print(f"report: {res['report']}")
