"""Layer-similarity results and layer choices, kept in the store beside the features.

    layers/<key>.json      matrices of one (dataset, vision entry, text entry, n, seed, k) with their settings, and
                           (under "calibration", when `layers` computed it) their permutation null: K and its seed,
                           per metric the null mean and sd, calibrated scores, p-values and family-wise p-values
    layers/<key>.png       the heatmap
    choices/<dataset>--<vision>--<text>.json   the (vision layer, text layer) that `train --layers auto` uses
"""

from __future__ import annotations

from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import choice_name
from stratalign.store.keys import layer_result_key as result_key

__all__ = ["choice_name", "heatmap_path", "load_choice", "load_result", "result_key",
           "save_choice", "save_heatmap", "save_result"]


def load_result(store: FeatureStore, key: str) -> dict[str, Any] | None:
    """A saved layer result, or None when absent or damaged (it is then computed again and overwritten)."""
    if not store.loc.exists("layers", f"{key}.json"):
        return None
    try:
        result = store.loc.read_json("layers", f"{key}.json")
    except StratalignError:
        return None
    return result if result_problem(result) is None else None


def result_problem(result: Any) -> str | None:
    """Why a layer result is unusable (None when it is whole): matrices of the right shape, layer names."""
    if not isinstance(result, dict):
        return "not an object"
    missing = [k for k in ("matrices", "vision_layers", "text_layers", "key") if k not in result]
    if missing:
        return f"lacks {missing}"
    nv, nt = len(result["vision_layers"]), len(result["text_layers"])
    for metric, mat in (result["matrices"] or {}).items():
        if not isinstance(mat, list) or len(mat) != nv or any(not isinstance(r, list) or len(r) != nt for r in mat):
            return f"matrix {metric} is not {nv} x {nt}"
    return None


def choice_problem(choice: Any) -> str | None:
    """Why a recorded layer choice is unusable (None when it is whole): two integer layer indices."""
    if not isinstance(choice, dict):
        return "not an object"
    for k in ("vision_layer", "text_layer"):
        if isinstance(choice.get(k), bool) or not isinstance(choice.get(k), int) or choice[k] < 0:
            return f"{k} is {choice.get(k)!r}, not a layer index"
    return None


def save_result(store: FeatureStore, key: str, result: dict[str, Any]) -> None:
    store.require_writable()
    store.loc.write_json(result, "layers", f"{key}.json")


def save_heatmap(store: FeatureStore, key: str, png: bytes) -> None:
    """Keep a result's heatmap (PNG bytes) beside it."""
    store.require_writable()
    store.loc.write_bytes(png, "layers", f"{key}.png")


def heatmap_path(store: FeatureStore, key: str) -> str:
    return store.loc.path("layers", f"{key}.png")


def save_choice(store: FeatureStore, dataset: str, vision: str, text: str, choice: dict[str, Any]) -> None:
    store.require_writable()
    store.loc.write_json(choice, "choices", choice_name(dataset, vision, text))


def load_choice(store: FeatureStore, dataset: str, vision: str, text: str) -> dict[str, Any]:
    name = choice_name(dataset, vision, text)
    if not store.loc.exists("choices", name):
        raise StratalignError(
            f"no layer choice recorded for {dataset} / {vision} / {text}; run: stratalign layers --dataset {dataset} "
            f"--vision {vision} --text {text} --choose best"
        )
    choice = store.loc.read_json("choices", name)
    why = choice_problem(choice)
    if why is not None:
        raise StratalignError(f"layer choice {store.loc.path('choices', name)} is damaged ({why}); record it again: "
                              f"stratalign layers --dataset {dataset} --vision {vision} --text {text} --choose best")
    return choice
