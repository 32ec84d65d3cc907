"""`stratalign layers`: layer-similarity matrices and the choice of layers to align."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from stratalign.cli.common import FeaturePrecisionOption, StoreOption, console, store_url


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
    permutations: int = typer.Option(200, help="Permutations of the null that calibrates mutual_knn / cycle_knn "
                                               "(the text rows shuffled, seeded by --seed); 0: raw scores only."),
    heatmap: Optional[str] = typer.Option(None, help="Also copy the heatmap PNG here."),
    recompute: bool = typer.Option(False, help="Ignore a saved result with the same settings."),
    feature_precision: Optional[str] = FeaturePrecisionOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Compare every vision layer with every text layer; save matrices + heatmap; record the layer choice."""
    from stratalign.stages.layers import LayersConfig, run_layers, top_pairs
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "a")
    cfg = LayersConfig(dataset=dataset, vision=vision, text=text, metrics=tuple(metric), k=_k(k), n=n, seed=seed,
                       clamp_outliers=clamp_outliers, permutations=permutations, feature_precision=feature_precision)
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
    if "calibrated_score" in choice:
        _print_calibration(result, choice)
    console.print(f"heatmap: {done.png}")


def _print_calibration(result: dict, choice: dict) -> None:
    """The chosen pair against the permutation null: calibrated score, p-values, and the last-layer pair."""
    cal = result["calibration"]
    summary = cal["metrics"][choice["metric"]]
    pairs = len(result["vision_layers"]) * len(result["text_layers"])
    console.print(f"calibrated {choice['metric']} (score - mean of {cal['permutations']} permuted-text scores"
                  + (f", {cal['seconds']:.2f}s" if not result["cached"] else "") + "): "
                  f"chosen pair {choice['calibrated_score']:.3f} (p={choice['p_value']:.3f}), "
                  f"last-layer pair {choice['last_calibrated']:.3f}")
    console.print(f"  family-wise p of the chosen pair (against the max of all {pairs} pairs under the null: mean "
                  f"{summary['max_null_mean']:.3f}, 95% {summary['max_null_q95']:.3f}): {choice['family_p']:.3f}")
    last = (choice["vision_layer"], choice["text_layer"]) == (len(result["vision_layers"]) - 1,
                                                             len(result["text_layers"]) - 1)
    if last:
        console.print("  the chosen pair is the last-layer pair")
    elif choice["beats_last"]:
        console.print(f"  the chosen pair beats the last-layer pair by "
                      f"{choice['calibrated_score'] - choice['last_calibrated']:.3f}, beyond the null's spread "
                      f"({choice['null_spread']:.3f})")
    else:
        console.print(f"[yellow]  the chosen pair is not distinguishable from the last-layer pair: it leads by "
                      f"{choice['calibrated_score'] - choice['last_calibrated']:.3f}, within the null's spread "
                      f"({choice['null_spread']:.3f} = 2 sd of the difference under the null)")
