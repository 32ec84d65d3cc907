"""Model weights on disk, never pickle: tensors with the model config inside (`model_tensors`, for the run
registry's weights file) and standalone safetensors files with JSON metadata (`save_heads` / `load_heads`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stratalign.core.heads import build_model
from stratalign.errors import StratalignError
from stratalign.train.config import TrainResult

CONFIG_KEY = "__stratalign_config__"


def _model_of(obj: Any) -> nn.Module:
    return obj.model if isinstance(obj, TrainResult) else obj


def model_tensors(model: nn.Module | TrainResult) -> dict[str, torch.Tensor]:
    """The model's tensors plus its JSON config as a uint8 tensor (so `model_from_tensors` can
    rebuild it from a plain safetensors file)."""
    m = _model_of(model)
    out = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
    blob = json.dumps(m.config, sort_keys=True).encode()
    out[CONFIG_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return out


def model_from_tensors(config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a model from `model_tensors` output (the run `config` is accepted for symmetry; the
    model's own config travels inside the tensors)."""
    if CONFIG_KEY not in tensors:
        raise StratalignError(f"saved weights lack {CONFIG_KEY}: not written by stratalign's model_tensors")
    mcfg = json.loads(bytes(tensors[CONFIG_KEY].numpy().tobytes()).decode())
    return _built(mcfg, {k: v for k, v in tensors.items() if k != CONFIG_KEY}, "saved weights")


def save_heads(path: str | Path, result: TrainResult | nn.Module) -> Path:
    """Write the model to a safetensors file; the model config (and, for a TrainResult, the train
    config and summary) go in the file's metadata as JSON."""
    m = _model_of(result)
    path = Path(path)
    meta = {"stratalign_model": json.dumps(m.config, sort_keys=True)}
    if isinstance(result, TrainResult):
        meta["stratalign_train"] = json.dumps(asdict(result.config), sort_keys=True)
        meta["stratalign_summary"] = json.dumps(result.summary(), sort_keys=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}, str(path), metadata=meta)
    return path


def load_heads(path: str | Path) -> nn.Module:
    """Rebuild the model saved by `save_heads` (AlignedHeads, CSA or CommModel), in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StratalignError(f"no heads file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise StratalignError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None
    if "stratalign_model" not in meta:
        raise StratalignError(f"{path} has no stratalign_model metadata: not written by save_heads")
    return _built(json.loads(meta["stratalign_model"]), tensors, f"{path}: weights")


def _built(config: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """The model a config describes with `state` loaded strictly, in eval mode; one error line naming `what`
    when the weights do not fit the config."""
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StratalignError(f"{what} do not fit their config: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model
