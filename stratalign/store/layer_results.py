"""Layer-similarity results and layer choices, kept in the store beside the features.

    layers/<key>.json      matrices of one (dataset, vision entry, text entry, n, seed, k) with their settings
    layers/<key>.png       the heatmap
    choices/<dataset>--<vision>--<text>.json   the (vision layer, text layer) that `train --layers auto` uses
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.features import FeatureStore


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:50] or "x"


def result_key(settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{_slug(settings['dataset'])}--{_slug(settings['vision'])}--{_slug(settings['text'])}--{h}"


def load_result(store: FeatureStore, key: str) -> dict[str, Any] | None:
    return store.loc.read_json("layers", f"{key}.json") if store.loc.exists("layers", f"{key}.json") else None


def save_result(store: FeatureStore, key: str, result: dict[str, Any]) -> None:
    store._writable()
    store.loc.write_json(result, "layers", f"{key}.json")


def heatmap_path(store: FeatureStore, key: str) -> str:
    return store.loc.path("layers", f"{key}.png")


def choice_name(dataset: str, vision: str, text: str) -> str:
    return f"{_slug(dataset)}--{_slug(vision)}--{_slug(text)}.json"


def save_choice(store: FeatureStore, dataset: str, vision: str, text: str, choice: dict[str, Any]) -> None:
    store._writable()
    store.loc.write_json(choice, "choices", choice_name(dataset, vision, text))


def load_choice(store: FeatureStore, dataset: str, vision: str, text: str) -> dict[str, Any]:
    name = choice_name(dataset, vision, text)
    if not store.loc.exists("choices", name):
        raise StratalignError(
            f"no layer choice recorded for {dataset} / {vision} / {text}; run: stratalign layers --dataset {dataset} "
            f"--vision {vision} --text {text} --choose best"
        )
    return store.loc.read_json("choices", name)
