"""The card of an aligned model: everything `AlignedModel` needs besides the head weights, read from a run.

A card names, per modality, the encoder (spec and the metadata its features were extracted with: weights
sha256, preprocessing), the chosen layer, the pooling and the dtype the features were stored in; the zero-shot
classes and templates of the run's dataset (as its evaluation uses them, docs/method.md § 4); and the run's
config and metrics. `stratalign export` writes it as model.json beside the heads (store.exports).
"""

from __future__ import annotations

from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.feature_store import MODALITIES, FeatureEntry, FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.version import __version__

__all__ = ["MODALITIES", "check_card", "run_card", "tower_card"]


def tower_card(entry: FeatureEntry, layer: int) -> dict[str, Any]:
    """One modality's part of the card, from the feature entry the run was trained on."""
    spec = entry.spec
    if not 0 <= layer < len(spec.dims):
        raise StratalignError(f"layer {layer} is outside entry {entry.key} (layers 0..{len(spec.dims) - 1})")
    return {"encoder": spec.encoder_spec, "encoder_metadata": spec.encoder, "layer": int(layer),
            "layer_name": spec.layer_names[layer], "pooling": spec.pooling, "dim": int(spec.dims[layer]),
            "feature_dtype": spec.dtype, "entry": entry.key}


def run_card(store: FeatureStore, run: str) -> tuple[dict[str, Any], bytes]:
    """(card, head weights as safetensors bytes) of a finished run (a full id or a unique prefix)."""
    reg = RunRegistry(store)
    run_id = reg.resolve(run)
    config, _, metrics = reg.load(run_id)
    for key in ("vision_entry", "text_entry", "vision_layer", "text_layer"):
        if key not in config:
            raise StratalignError(f"run {run_id} records no {key} in its config; it cannot be used as a model")
    towers = {"image": tower_card(store.entry(config["vision_entry"]), int(config["vision_layer"])),
              "text": tower_card(store.entry(config["text_entry"]), int(config["text_layer"]))}
    zero_shot = None
    if config.get("dataset") in store.datasets():
        ds = store.dataset(config["dataset"])
        if ds.class_names:
            zero_shot = {"dataset": ds.name, "classes": list(ds.class_names), "templates": list(ds.templates)}
    card = {"run_id": run_id, "objective": config.get("objective"), "head": config.get("head"),
            "dataset": config.get("dataset"), "towers": towers, "zero_shot": zero_shot, "run_config": config,
            "metrics": metrics, "stratalign_version": __version__}
    return card, reg.weights_bytes(run_id)


def check_card(card: dict[str, Any]) -> None:
    """Refuse a card without the parts AlignedModel reads, naming the first missing one."""
    towers = card.get("towers")
    if not isinstance(towers, dict):
        raise StratalignError("model card has no towers")
    for m in MODALITIES:
        tower = towers.get(m)
        missing = [k for k in ("encoder", "encoder_metadata", "layer", "pooling", "dim", "feature_dtype")
                   if not isinstance(tower, dict) or k not in tower]
        if missing:
            raise StratalignError(f"model card's {m} tower lacks {', '.join(missing)}")
