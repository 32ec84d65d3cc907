"""Stage 2 runner: read cached TRAIN-split features, compute the layer matrices, save them, choose layers."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stratalign.core import calibration
from stratalign.core.layer_rule import CHOOSE_KEYWORDS, LayerRule
from stratalign.errors import StratalignError, require_int
from stratalign.stages.subsets import PairRows, drop_bad_pairs
from stratalign.store import layer_results
from stratalign.store.entry_spec import check_feature_precision
from stratalign.store.feature_store import FeatureEntry, FeatureStore


@dataclass(frozen=True)
class LayersConfig:
    """What `stratalign layers` computes; resolved once."""

    dataset: str
    vision: str
    text: str
    metrics: tuple[str, ...] = ("mutual_knn",)
    k: int | str = "rice"
    n: int = 5000
    seed: int = 0
    vision_pooling: str | None = None
    text_pooling: str | None = None
    clamp_outliers: bool = False
    feature_precision: str | None = None  # the features' forward precision (fp32 | bf16); None: fp32 first
    # K of the permutation null (METHOD 2, calibration; drawn with `seed`); 0: no calibration. Not part of the
    # result's key: the null is kept in the result file beside the raw matrices it calibrates.
    permutations: int = calibration.PERMUTATIONS

    def __post_init__(self) -> None:
        require_int(self.n, "--n (train pairs compared)", 1)
        require_int(self.seed, "--seed")
        require_int(self.permutations, "--permutations", 0)
        check_feature_precision(self.feature_precision)
        if self.permutations == 1:
            raise StratalignError("--permutations must be 0 (raw scores only) or at least 2 (a null needs a spread)")
        if isinstance(self.k, int):
            require_int(self.k, "--k", 1)


def sample_train_pairs(store: FeatureStore, dataset: str, n: int, seed: int,
                       entries: tuple[FeatureEntry, FeatureEntry] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(image rows, caption rows, pairs dropped): n pairs from the TRAIN split, one caption per image, drawn
    with a seed, after dropping the pairs with a bad (placeholder) row in the (vision, text) `entries`."""
    ds = store.dataset(dataset)
    ds.require_train_split("choose layers")
    pairs = PairRows(*ds.pairs("train"))
    dropped = 0
    if entries is not None:
        pairs, dropped = drop_bad_pairs(pairs, *entries)
        if len(pairs) == 0:
            raise StratalignError(f"all {dropped} train pairs of {dataset!r} have an unreadable image or caption")
    img_rows, cap_rows = pairs.image_rows, pairs.caption_rows
    rng = np.random.default_rng([seed, 31337])
    order = rng.permutation(len(img_rows))
    _, first = np.unique(img_rows[order], return_index=True)  # one random caption per image
    pick = order[np.sort(first)]
    if len(pick) > n:
        pick = np.sort(rng.choice(pick, size=n, replace=False))
    return img_rows[pick], cap_rows[pick], dropped


def _entries(store: FeatureStore, cfg: LayersConfig) -> tuple[FeatureEntry, FeatureEntry]:
    v = store.find_entry(cfg.dataset, cfg.vision, cfg.vision_pooling, precision=cfg.feature_precision)
    t = store.find_entry(cfg.dataset, cfg.text, cfg.text_pooling, precision=cfg.feature_precision)
    if v.spec.modality != "image" or t.spec.modality != "text":
        raise StratalignError(f"--vision must name an image encoder and --text a text encoder "
                              f"(got {v.spec.modality} and {t.spec.modality})")
    return v, t


def _calibrated_metrics(cfg: LayersConfig) -> list[str]:
    """The asked metrics that get a permutation null (none when permutations = 0)."""
    return [m for m in cfg.metrics if m in calibration.CALIBRATED_METRICS] if cfg.permutations else []


def _has_calibration(result: dict[str, Any], cfg: LayersConfig) -> bool:
    cal = result.get("calibration") or {}
    return (cal.get("permutations") == cfg.permutations and cal.get("seed") == cfg.seed
            and set(_calibrated_metrics(cfg)) <= set(cal.get("metrics") or {}))


def compute_layer_matrices(store: FeatureStore, cfg: LayersConfig, *, recompute: bool = False,
                           calibrate: bool = False) -> dict[str, Any]:
    """The L_vision x L_text matrix of every metric asked (cached in the store by its settings); with `calibrate`,
    also the permutation null of the kNN metrics (`core.calibration`, reusing the kNN graphs), kept in the same
    result file under "calibration" (the key does not change: a result saved without it gains it)."""
    from stratalign.core import similarity
    store.dataset(cfg.dataset).require_train_split("choose layers")  # before anything else is read
    v_entry, t_entry = _entries(store, cfg)
    img_rows, cap_rows, dropped = sample_train_pairs(store, cfg.dataset, cfg.n, cfg.seed, (v_entry, t_entry))
    settings = {**asdict(cfg), "metrics": sorted(cfg.metrics), "vision_entry": v_entry.key,
                "text_entry": t_entry.key, "dataset_fingerprint": store.dataset(cfg.dataset).fingerprint}
    del settings["permutations"]  # the null's K is recorded in the calibration, not in the key
    del settings["feature_precision"]  # which entries were read: their keys are in the key already
    if dropped:  # only then: results saved before bad rows were dropped stay valid where there are none
        settings["bad_pairs_dropped"] = dropped
    key = layer_results.result_key(settings)
    cached = None if recompute else layer_results.load_result(store, key)
    wanted = _calibrated_metrics(cfg) if calibrate else []
    if cached is not None and (not wanted or _has_calibration(cached, cfg)):
        return {**cached, "bad_pairs_dropped": dropped, "cached": True}
    n = len(img_rows)
    k = similarity.resolve_k(cfg.k, n)
    t0 = time.perf_counter()
    vision = [v_entry.read_layer(i, img_rows).astype(np.float32) for i in range(len(v_entry.spec.dims))]
    text = [t_entry.read_layer(i, cap_rows).astype(np.float32) for i in range(len(t_entry.spec.dims))]
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mats, graphs = similarity.layer_similarity_and_graphs(vision, text, metrics=cfg.metrics, k=k,
                                                         clamp_outliers=cfg.clamp_outliers)
    compute_s = time.perf_counter() - t0
    result = cached or {
        "key": key, "settings": settings, "n": n, "k": k, "bad_pairs_dropped": dropped,
        "vision_layers": list(v_entry.spec.layer_names), "text_layers": list(t_entry.spec.layer_names),
        "matrices": {m: np.asarray(x).tolist() for m, x in mats.items()},
        "seconds": {"read": round(read_s, 3), "compute": round(compute_s, 3)},
    }
    if wanted and graphs is not None:
        t0 = time.perf_counter()
        null = calibration.overlap_null(*graphs, calibration.permutations(n, cfg.permutations, cfg.seed), wanted)
        result = {**result, "calibration": {
            "permutations": cfg.permutations, "seed": cfg.seed, "seconds": round(time.perf_counter() - t0, 3),
            "raw_seconds": round(compute_s, 3),
            "metrics": {m: calibration.summarise(mats[m], null[m]) for m in wanted}}}
    if store.mode == "a":
        layer_results.save_result(store, key, result)
    return {**result, "cached": False}


def choose(result: dict[str, Any], rule: str, metric: str | None = None) -> dict[str, Any]:
    """The (vision, text) layer pair by rule: best (argmax of the metric), last, or an explicit 'V,T'."""
    metric = metric or next(iter(result["matrices"]))
    if metric not in result["matrices"]:
        raise StratalignError(f"metric {metric!r} was not computed; computed: {list(result['matrices'])}")
    parsed = LayerRule.parse(rule, CHOOSE_KEYWORDS, "--choose", indices=True)
    mat = np.asarray(result["matrices"][metric])
    nv, nt = mat.shape
    if parsed.kind == "best":
        v, t = (int(i) for i in np.unravel_index(int(np.argmax(mat)), mat.shape))
    elif parsed.kind == "last":
        v, t = nv - 1, nt - 1
    else:
        v, t = check_pair(parsed.index_pair(), nv, nt, rule)
    out = {"rule": rule, "metric": metric, "vision_layer": v, "text_layer": t, "score": float(mat[v, t]),
           "vision_name": result["vision_layers"][v], "text_name": result["text_layers"][t],
           "last_score": float(mat[-1, -1]), "result_key": result["key"]}
    cal = calibration_of(result, metric)
    if cal is not None:  # calibrated score, p-values, and whether it beats the last pair beyond the null's spread
        out.update(calibration.pair_verdict(cal, v, t), permutations=result["calibration"]["permutations"])
    return out


def calibration_of(result: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The permutation-null summary of one metric of a layer result (None when it was not calibrated)."""
    return ((result.get("calibration") or {}).get("metrics") or {}).get(metric)


def check_pair(pair: tuple[int, int], nv: int, nt: int, rule: str) -> tuple[int, int]:
    """An explicit (vision, text) layer pair within the layers there are (negative counts from the end)."""
    v, t = pair
    if not (-nv <= v < nv and -nt <= t < nt):
        raise StratalignError(f"layer pair {rule} out of range: vision 0..{nv - 1}, text 0..{nt - 1}")
    return v % nv, t % nt


def top_pairs(result: dict[str, Any], metric: str, count: int = 5) -> list[tuple[int, int, float]]:
    mat = np.asarray(result["matrices"][metric])
    flat = np.argsort(-mat, axis=None, kind="stable")[:count]
    return [(int(i // mat.shape[1]), int(i % mat.shape[1]), float(mat.flat[i])) for i in flat]


def write_heatmap(store: FeatureStore, result: dict[str, Any], choice: dict[str, Any],
                  copy_to: str | None = None) -> str:
    """Heatmap PNG of the choice's metric, chosen and last pairs marked, saved in the store (and copy_to)."""
    from stratalign.report.plots import layer_heatmap

    cal = calibration_of(result, choice["metric"])
    mat = np.asarray(result["matrices"][choice["metric"]] if cal is None else cal["calibrated"])
    label = choice["metric"] if cal is None else f"{choice['metric']} - null mean (calibrated)"
    null = "" if cal is None else f", null of {result['calibration']['permutations']} permutations"
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "heatmap.png")
        layer_heatmap(mat, png, vision_names=result["vision_layers"], text_names=result["text_layers"],
                      title=f"{label}: {result['settings']['vision']} x {result['settings']['text']} "
                            f"(n={result['n']}, k={result['k']}{null})",
                      chosen=(choice["vision_layer"], choice["text_layer"]), last=(mat.shape[0] - 1, mat.shape[1] - 1),
                      metric=label)
        with open(png, "rb") as f:
            data = f.read()
    if store.mode == "a":
        layer_results.save_heatmap(store, result["key"], data)
    if copy_to:
        os.makedirs(os.path.dirname(os.path.abspath(copy_to)), exist_ok=True)
        with open(copy_to, "wb") as f:
            f.write(data)
        return copy_to
    return layer_results.heatmap_path(store, result["key"])


def record_choice(store: FeatureStore, cfg: LayersConfig, choice: dict[str, Any]) -> None:
    """Save the choice where `train --layers auto` finds it (per dataset, vision and text encoder)."""
    layer_results.save_choice(store, cfg.dataset, cfg.vision, cfg.text, choice)


@dataclass(frozen=True)
class LayersOutcome:
    """What `run_layers` did: the matrices (result), the recorded choice, and the heatmap PNG written."""

    result: dict[str, Any]
    choice: dict[str, Any]
    png: str


def run_layers(store: FeatureStore, cfg: LayersConfig, rule: str = "best", by: str | None = None,
               heatmap_copy: str | None = None, *, recompute: bool = False) -> LayersOutcome:
    """The layers stage: compute (or read back) the matrices and their permutation null, choose the layer pair by
    `rule` on metric `by` (raw argmax, as published; the choice carries its calibrated score and p-values), write
    the heatmap of calibrated scores (also to `heatmap_copy`), and record the choice for `train --layers auto`."""
    parsed = LayerRule.parse(rule, CHOOSE_KEYWORDS, "--choose", indices=True)  # bad text: before any work
    store.require_writable("run_layers (matrices, heatmap, layer choice)")  # before any work, not after it
    if parsed.is_pair:
        v_entry, t_entry = _entries(store, cfg)
        check_pair(parsed.index_pair(), len(v_entry.spec.dims), len(t_entry.spec.dims), rule)
    result = compute_layer_matrices(store, cfg, recompute=recompute, calibrate=True)
    # by default the first metric asked (a saved result lists its matrices in another order)
    choice = choose(result, rule, by or cfg.metrics[0])
    png = write_heatmap(store, result, choice, copy_to=heatmap_copy)
    record_choice(store, cfg, choice)
    return LayersOutcome(result=result, choice=choice, png=png)
