"""`stratalign layers`: layer-similarity matrices and the choice of layers to align."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from stratalign.cli.common import StoreOption, console, store_url


def _k(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def layers_cmd(
    dataset: str = typer.Option(..., help="Dataset whose TRAIN split is compared."),
    vision: str = typer.Option(..., help="Vision encoder spec (extracted)."),
    text: str = typer.Option(..., help="Text encoder spec (extracted)."),
    metric: list[str] = typer.Option(["mutual_knn"], "--metric", help="mutual_knn, cka, unbiased_cka, cknna, cycle_knn."),
    k: str = typer.Option("rice", help="Neighbours: an integer, or rice | sqrt | sturges (rules of n)."),
    n: int = typer.Option(5000, help="Train pairs compared (all when the split is smaller)."),
    seed: int = typer.Option(0, help="Seed of the sample of train pairs."),
    choose_rule: str = typer.Option("best", "--choose", help="best | last | V,T: recorded for `train --layers auto`."),
    by: Optional[str] = typer.Option(None, help="Metric the choice uses (default: the first --metric)."),
    clamp_outliers: bool = typer.Option(False, help="Clip each layer to its 0.95 quantile of |x| first."),
    heatmap: Optional[str] = typer.Option(None, help="Also copy the heatmap PNG here."),
    recompute: bool = typer.Option(False, help="Ignore a saved result with the same settings."),
    store: Optional[str] = StoreOption,
) -> None:
    """Compare every vision layer with every text layer; save matrices + heatmap; record the layer choice."""
    from stratalign.stages.layers import LayersConfig, run_layers, top_pairs
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "a")
    cfg = LayersConfig(dataset=dataset, vision=vision, text=text, metrics=tuple(metric), k=_k(k), n=n, seed=seed,
                       clamp_outliers=clamp_outliers)
    done = run_layers(fs, cfg, choose_rule, by, heatmap_copy=heatmap, recompute=recompute)
    result, choice = done.result, done.choice
    how = "read saved result" if result["cached"] else f"computed in {result['seconds']['compute']:.2f}s"
    console.print(f"{vision} x {text} on {result['n']} train pairs of {dataset}, k={result['k']} ({how})")
    if result.get("bad_pairs_dropped"):
        console.print(f"[yellow]{result['bad_pairs_dropped']} train pair(s) dropped: their image or caption was "
                      "unreadable at extract (--skip-bad placeholders)")
    for m in result["matrices"]:
        tops = ", ".join(f"({v},{t})={s:.3f}" for v, t, s in top_pairs(result, m))
        last = result["matrices"][m][-1][-1]
        console.print(f"  {m}: top pairs {tops}; last-layer pair={last:.3f}")
    console.print(f"chosen ({choose_rule} by {choice['metric']}): vision layer {choice['vision_layer']} "
                  f"{escape('[' + choice['vision_name'] + ']')}, text layer {choice['text_layer']} "
                  f"{escape('[' + choice['text_name'] + ']')}, "
                  f"score {choice['score']:.3f} vs last {choice['last_score']:.3f}")
    console.print(f"heatmap: {done.png}")
