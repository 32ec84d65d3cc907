"""The card of an aligned model: everything `AlignedModel` needs besides the head weights, read from a run.

A card names, per modality, the encoder (spec and the metadata its features were extracted with: weights
sha256, preprocessing), the chosen layer, the pooling and the dtype the features were stored in; the zero-shot
classes and templates of the run's dataset (as its evaluation uses them, docs/method.md § 4); and the run's
config and metrics. `stratalign export` writes it as model.json beside the heads (store.exports).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.feature_store import MODALITIES, FeatureEntry, FeatureStore
from stratalign.store.runs import RunRegistry
from stratalign.version import __version__

__all__ = ["MODALITIES", "Tower", "check_card", "run_card", "tower_card"]


@dataclass(frozen=True)
class Tower:
    """How one modality is embedded: encoder spec and extraction metadata, layer, pooling, feature dtype."""

    modality: str
    encoder: str
    metadata: dict[str, Any]
    layer: int
    layer_name: str
    pooling: str
    dim: int
    feature_dtype: str

    @classmethod
    def from_card(cls, card: dict[str, Any], modality: str) -> "Tower":
        t = card["towers"][modality]
        return cls(modality, str(t["encoder"]), dict(t["encoder_metadata"]), int(t["layer"]),
                   str(t.get("layer_name", t["layer"])), str(t["pooling"]), int(t["dim"]), str(t["feature_dtype"]))


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
    heads = reg.weights_bytes(run_id)  # raw bytes: a card is read without torch (use.fast)
    config, metrics = reg.config(run_id), reg.metrics(run_id)
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
    return card, heads


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


def wilson(p_percent: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval (in percent) of a proportion measured on n independent queries."""
    p = p_percent / 100.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


# metric -> the count of its independent queries in metrics.json (retrieval over the test split; zero-shot over
# its images)
_METRIC_N = {"t2i_R@1": "eval_captions", "t2i_R@5": "eval_captions", "t2i_R@10": "eval_captions",
             "i2t_R@1": "eval_images", "i2t_R@5": "eval_images", "i2t_R@10": "eval_images",
             "zs_top1": "eval_images", "zs_balanced_acc": None}


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for name, count in _METRIC_N.items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or value != value:
            continue
        n = metrics.get(count) if count else None
        if isinstance(n, int) and n > 0:
            lo, hi = wilson(float(value), n)
            rows.append(f"| {name} | {value:.2f} | [{lo:.2f}, {hi:.2f}] | {n} |")
        else:
            rows.append(f"| {name} | {value:.2f} | not known | - |")
    return rows


def model_card_markdown(card: dict[str, Any]) -> str:
    """The export's README.md: a Hugging Face style model card written from the card (encoders, chosen layers,
    training data fingerprint and size, objective and its knobs, test metrics with 95% intervals, intended use
    and limits). Deterministic: the same card gives the same bytes."""
    from stratalign.core.objectives import objective_named

    cfg = card.get("run_config") or {}
    train = cfg.get("train") or {}
    metrics = card.get("metrics") or {}
    objective = str(card.get("objective"))
    try:
        knobs = objective_named(objective).knobs
    except StratalignError:
        knobs = ()
    shown = {k: train[k] for k in ("dim", "tau", "lr", "max_steps", "batch_size", "select", *knobs) if k in train}
    towers = card["towers"]
    lines = [
        "---", "library_name: stratalign", "tags: [image-text-alignment, zero-shot-classification, retrieval]",
        f"datasets: [{cfg.get('dataset')}]", "---", "",
        f"# {card.get('run_id')}", "",
        f"Two frozen encoders aligned by small trained heads (objective `{objective}`, head `{card.get('head')}`), "
        "made with stratalign. Load it with `AlignedModel.from_pretrained(\"<this folder>\")`.", "",
        "## Encoders and chosen layers", "",
        "| modality | encoder | layer | pooling | feature dim | weights sha256 |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in MODALITIES:
        t = towers[m]
        sha = str((t.get("encoder_metadata") or {}).get("weights_sha256") or "?")[:16]
        lines.append(f"| {m} | `{t['encoder']}` | {t['layer']} ({t.get('layer_name', t['layer'])}) | {t['pooling']} "
                     f"| {t['dim']} | `{sha}...` |")
    lines += [
        "", "## Training data", "",
        f"- dataset: `{cfg.get('dataset')}`, fingerprint `{cfg.get('dataset_fingerprint')}`",
        f"- pairs: {cfg.get('n_pairs')} ({cfg.get('n_train')} trained on, {cfg.get('n_val')} for validation, "
        f"validation: {cfg.get('validation')})",
        "", "## Objective and knobs", "",
        f"- objective `{objective}`, head `{card.get('head')}`, seed {cfg.get('seed')}, layer rule "
        f"`{cfg.get('layer_rule')}`",
        *[f"- {k}: `{json.dumps(v)}`" for k, v in shown.items()],
        f"- checkpoint: {metrics.get('message', 'n/a')}",
        "", f"## Metrics (test split of `{metrics.get('eval_dataset', cfg.get('dataset'))}`)", "",
        "| metric | value (%) | 95% interval (Wilson) | queries |", "| --- | --- | --- | --- |",
        *(_metric_rows(metrics) or ["| (none recorded) | | | |"]),
        "", "## Intended use and limits", "",
        "- Intended: text-to-image and image-to-text retrieval and zero-shot classification in the domain of the "
        "training data; research comparisons of alignment objectives.",
        "- The encoders are not included: the same encoder weights (sha256 above) must be installed; another version "
        "is refused.",
        f"- Trained on {cfg.get('n_train')} pairs of one dataset: expect lower accuracy out of that domain; the "
        "intervals above cover the test queries' sampling only, not a change of domain.",
        "- Classification probabilities are softmax(cosine / tau) at the training temperature "
        f"tau = {train.get('tau', 'n/a')}; they are not calibrated on held-out data.",
        "- Inherits the biases of both encoders and of the training captions; not for decisions about people.",
        "", f"stratalign {card.get('stratalign_version')}", "",
    ]
    return "\n".join(lines)
