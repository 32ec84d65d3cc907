"""Layer-similarity results and layer choices, kept in the store beside the features.

    layers/<key>.json      matrices of one (dataset, vision entry, text entry, n, seed, k) with their settings
    layers/<key>.png       the heatmap
    choices/<dataset>--<vision>--<text>.json   the (vision layer, text layer) that `train --layers auto` uses
"""

from __future__ import annotations

from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.features import FeatureStore
from stratalign.store.keys import choice_name
from stratalign.store.keys import layer_result_key as result_key

__all__ = ["choice_name", "heatmap_path", "load_choice", "load_result", "result_key",
           "save_choice", "save_heatmap", "save_result"]


def load_result(store: FeatureStore, key: str) -> dict[str, Any] | None:
    return store.loc.read_json("layers", f"{key}.json") if store.loc.exists("layers", f"{key}.json") else None


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
    return store.loc.read_json("choices", name)
