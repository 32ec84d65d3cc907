"""ONNX graphs of a run's query parts, exported once from the torch model and checked against it (use.fast).

- The text tower: the encoder's `forward_layer` traced (torch.onnx's TorchScript exporter: the hook that stops the
  forward pass after the chosen block stops the trace there too, so the graph holds only the blocks it needs) on
  token ids of any batch size and length, with the tokenizer as the `tokenizers` library's JSON (truncation and
  padding as the encoder's `preprocess` sets them). Only encoders whose `preprocess` is a fast Hugging Face
  tokenizer qualify.
- A head: features -> unit embedding, exactly `head_embedding` (a variational head's normalised mean).

Each graph is run on probe inputs with onnxruntime and compared with the torch forward pass: the tokens must be
equal and the outputs within `TOLERANCE` (relative to the largest output); anything else is `NotExportable`, and
the torch model keeps answering.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from stratalign.errors import StratalignError

if TYPE_CHECKING:  # torch is imported by the functions that export (use.fast imports this module for its names)
    import torch

    from stratalign.use.model import AlignedModel

EXPORTER = 1  # the graphs' recipe: part of every cache key (use.fast), so a changed recipe exports again
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
OPSET = 17
TOLERANCE = 1e-4  # max |onnx - torch| / max(1, max |torch|) on the probes (float32 kernels differ by ~1e-6)
PROBES = ["a photo of a cat", "dog", "", "a much longer sentence about a small yellow bird sitting on a branch " * 3,
          "grinning face with smiling eyes", "word " * 600]  # the last one is truncated at the encoder's max length


class NotExportable(StratalignError):
    """This part of the model has no ONNX graph (a CoMM fusion model, a tokenizer the `tokenizers` library cannot
    run, a graph that does not match the torch forward pass): the torch model answers instead."""


def _onnx_bytes(module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
                dynamic: dict[str, dict[int, str]]) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():  # TracerWarnings and the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, dynamo=False, input_names=names, output_names=["output"],
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)
    return buf.getvalue()


def _session(data: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _check(got: np.ndarray, want: np.ndarray, what: str) -> float:
    if got.shape != want.shape:
        raise NotExportable(f"the ONNX {what} gives shape {got.shape}, torch {want.shape}")
    err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max()))) if want.size else 0.0
    if not err <= TOLERANCE:
        raise NotExportable(f"the ONNX {what} differs from torch by {err:.2e} (tolerance {TOLERANCE:.0e})")
    return err


def _tokenizer_json(encoder: Any) -> str:
    """The encoder's fast tokenizer as `tokenizers` JSON, truncating and padding as its `preprocess` does."""
    from tokenizers import Tokenizer

    hf = getattr(encoder, "tokenizer", None)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or not getattr(encoder, "max_length", None):
        raise NotExportable(f"text encoder {encoder.spec} has no fast (tokenizers) tokenizer")
    tok = Tokenizer.from_str(backend.to_str())
    tok.enable_truncation(int(encoder.max_length), direction=getattr(hf, "truncation_side", "right"))
    tok.enable_padding(direction=getattr(hf, "padding_side", "right"), pad_id=int(hf.pad_token_id),
                       pad_type_id=int(getattr(hf, "pad_token_type_id", 0) or 0), pad_token=str(hf.pad_token))
    return tok.to_str()


def text_tower(model: AlignedModel) -> tuple[dict[str, bytes], dict[str, Any]]:
    """({"model.onnx", "tokenizer.json"}, description) of the run's text tower cut at its layer, checked."""
    import torch
    from tokenizers import Tokenizer

    class Cut(torch.nn.Module):
        def __init__(self, encoder: Any, keys: list[str], layer: int, pooling: str) -> None:
            super().__init__()
            self.encoder, self.keys, self.layer, self.pooling = encoder, keys, layer, pooling

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.encoder.forward_layer(dict(zip(self.keys, tensors)), self.layer, self.pooling).float()

    tower = model.towers["text"]
    enc = model.encoder("text")
    if torch.device(enc.device).type != "cpu":
        raise NotExportable(f"text encoder {tower.encoder} runs on {enc.device}: ONNX graphs are for the CPU")
    keys = [k for k in getattr(enc, "_text_keys", ()) if k in ENCODING_FIELDS]
    if "input_ids" not in keys:
        raise NotExportable(f"text encoder {tower.encoder} takes no token ids")
    tok_json = _tokenizer_json(enc)
    sample = enc.preprocess(["a photo of a cat", "a small yellow bird on a branch"])
    if sorted(sample) != sorted(keys):
        raise NotExportable(f"text encoder {tower.encoder} takes {sorted(sample)}, not {keys}")
    dynamic = {k: {0: "batch", 1: "tokens"} for k in keys} | {"output": {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad():
        data = _onnx_bytes(Cut(enc, keys, tower.layer, tower.pooling), tuple(sample[k].cpu() for k in keys),
                           keys, dynamic)
    tokenizer = Tokenizer.from_str(tok_json)
    encodings = tokenizer.encode_batch(PROBES)
    feeds = {k: np.asarray([getattr(e, ENCODING_FIELDS[k]) for e in encodings], dtype=np.int64) for k in keys}
    want_tokens = enc.preprocess(PROBES)
    for k in keys:
        if not np.array_equal(feeds[k], want_tokens[k].cpu().numpy()):
            raise NotExportable(f"the tokenizers library tokenizes differently from {tower.encoder}'s tokenizer ({k})")
    got = _session(data).run(None, feeds)[0]
    with torch.inference_mode():
        want = enc.forward_layer(want_tokens, tower.layer, tower.pooling).float().cpu().numpy()
    err = _check(got, want, f"text tower of {tower.encoder}")
    meta = {"kind": "text tower", "encoder": tower.encoder, "layer": tower.layer, "pooling": tower.pooling,
            "inputs": keys, "exporter": EXPORTER, "opset": OPSET, "torch": torch.__version__,
            "checked": {"probes": len(PROBES), "max_relative_error": err, "tolerance": TOLERANCE}}
    return {"model.onnx": data, "tokenizer.json": tok_json.encode()}, meta


def head(model: AlignedModel, modality: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """({"model.onnx"}, description) of the run's head of one modality: features -> unit embedding, checked."""
    import torch

    from stratalign.train.inference import head_embedding

    class Head(torch.nn.Module):
        def __init__(self, head: torch.nn.Module) -> None:
            super().__init__()
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return head_embedding(self.head, x)

    if model.is_fusion:
        raise NotExportable(f"run {model.run_id} is a CoMM fusion model: its query side stays in torch")
    dim = model.towers[modality].dim
    if model.device.type != "cpu":
        raise NotExportable(f"run {model.run_id} runs on {model.device}: ONNX graphs are for the CPU")
    module = Head(model.model.head(modality))
    with torch.inference_mode(False), torch.no_grad():
        data = _onnx_bytes(module, (torch.zeros(2, dim),), ["features"], {"features": {0: "batch"}, "output": {0: "batch"}})
    probe = np.random.default_rng(0).standard_normal((17, dim)).astype(np.float32)
    got = _session(data).run(None, {"features": probe})[0]
    err = _check(got, model.encode_features(probe, modality), f"{modality} head of {model.run_id}")
    meta = {"kind": "head", "run_id": model.run_id, "modality": modality, "exporter": EXPORTER, "opset": OPSET,
            "torch": torch.__version__, "checked": {"probes": len(probe), "max_relative_error": err,
                                                      "tolerance": TOLERANCE}}
    return {"model.onnx": data}, meta
