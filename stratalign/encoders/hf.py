"""`hf:<model id or local dir>[:image|:text]`: a transformers model run with output_hidden_states=True.

Modality comes from the config: a model type with an image processor (ViT, DINOv2, DeiT, BEiT, ConvNeXt,
ResNet, ...) is a vision model; a CLIP/SigLIP checkpoint (config with vision_config and text_config) is
loaded as its vision tower (CLIPVisionModel) unless the spec ends in `:text` (CLIPTextModel); anything with
a vocabulary is a text model. Preprocessing: AutoImageProcessor, or AutoTokenizer with padding to the
longest row and truncation to the model's max length.

Layers are the model's `hidden_states`: index 0 is the embedding output (for CLIP vision, the input of the
first block, i.e. after `pre_layrnorm`), index i the output of block i. In HF ViT, DINOv2 and CLIP the
final LayerNorm (`layernorm` / `post_layernorm`) is applied after the encoder to `last_hidden_state` /
the pooled output only, so every hidden state, the last included, is taken before it (checked in
tests/encoders/test_base_encoders.py: hidden_states[-1] != last_hidden_state == layernorm(hidden_states[-1])).

A one-row probe forward at load time fixes the layer count and dims and tells the token layout:
- ViT: prefix tokens = tokens - patches (class token, plus DINOv2 register tokens or the DeiT distillation
  token); `cls` = token 0, `mean` = mean over the patch tokens only. A model without a class token
  (SigLIP) offers `mean` only.
- text: `cls` = token 0, `mean` = attention-mask-weighted mean. Causal text models (the CLIP text tower)
  offer `eos` (last attended token) instead of `cls`, because their token 0 never sees the text.
- CNN backbones (hidden states are feature maps): `avg` global average pooling.

Under a CPU bf16 autocast (extraction's `--precision bf16`), a DINOv2 model runs its own bf16 path
(encoders.dinov2_bf16: weights cast and packed once, fused q/k/v, float32 residual stream), not the
transformers forward under autocast; the fp32 forward is the transformers model's, unchanged.

`weights_sha256` (part of the entry key) hashes the weight files from_pretrained read (the folder's or
the HF cache snapshot's safetensors / bin, shards included: encoders.hf_weights), else the loaded model's
state_dict.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Sequence

import torch

from stratalign.core.pooling import pool_layers
from stratalign.encoders import dinov2_bf16
from stratalign.encoders.base import Encoder, LayerReached, state_dict_sha256, to_device, weights_sha256
from stratalign.encoders.hf_weights import resolve_weight_files as _resolve_weight_files
from stratalign.errors import StratalignError

TOWERS = ("image", "text")
DUAL_TOWER_CLASSES = {
    "clip": ("CLIPVisionModel", "CLIPTextModel"),
    "siglip": ("SiglipVisionModel", "SiglipTextModel"),
    "siglip2": ("Siglip2VisionModel", "Siglip2TextModel"),
}
CAUSAL_TEXT_TYPES = {"clip", "clip_text_model", "gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2", "qwen3",
                     "phi", "phi3", "opt", "bloom", "falcon", "gemma", "gemma2"}
TEXT_ROLES = ("input_ids", "attention_mask", "token_type_ids")


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """'hf:<ident>[:image|:text]' -> (ident, tower or None)."""
    body = spec[3:] if spec.startswith("hf:") else spec
    tower = None
    for t in TOWERS:
        if body.endswith(":" + t):
            body, tower = body[: -len(t) - 1], t
            break
    if not body:
        raise StratalignError(f"encoder spec {spec!r} names no model: use hf:<model id or local folder>")
    return body, tower


def _is_dual(cfg: Any) -> bool:
    return hasattr(cfg, "vision_config") and hasattr(cfg, "text_config")


def _config_modality(cfg: Any) -> str:
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    mt = getattr(cfg, "model_type", "")
    if mt in IMAGE_PROCESSOR_MAPPING_NAMES or mt.endswith("vision_model"):
        return "image"
    if hasattr(cfg, "vocab_size"):
        return "text"
    if hasattr(cfg, "num_channels") or hasattr(cfg, "image_size"):
        return "image"
    raise StratalignError(f"cannot tell whether model type {mt!r} is a vision or a text model")


def weights_hash(ident: str, model: torch.nn.Module, revision: str | None = None) -> str:
    """sha256 of the weight files the model was loaded from; when they cannot be found, of its state_dict."""
    files, root = _resolve_weight_files(ident, revision)
    return weights_sha256(files, root) if files else state_dict_sha256(model)


def _max_text_length(tokenizer: Any, cfg: Any) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 100_000:
        return n
    n = getattr(cfg, "max_position_embeddings", None) or 512
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= 2
    return int(n)


class HFEncoder(Encoder):
    """A transformers model that returns hidden states; pools all of them from one forward pass."""

    def __init__(self, spec: str, model: torch.nn.Module, modality: str, *, tokenizer: Any = None,
                 image_processor: Any = None, image_transform: Any = None, max_length: int | None = None,
                 causal: bool = False, weights_sha: str, preprocessing: dict[str, Any],
                 extra_metadata: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.model = self.frozen(model)
        self.modality = modality
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_transform = image_transform
        self.max_length = max_length
        self.causal = causal
        self._weights_sha = weights_sha
        self._preprocessing = preprocessing
        self._extra = dict(extra_metadata or {})
        self._tok_lock = threading.Lock()
        accepted = set(inspect.signature(self.model.forward).parameters)
        self._text_keys = tuple(k for k in TEXT_ROLES if k in accepted)
        self.bf16_path = dinov2_bf16.runner_for(self.model)  # None: bf16 is the model under autocast
        self.to(device)
        self._probe()

    # --- layout from one probe row ----------------------------------------------------------------
    def _probe(self) -> None:
        from PIL import Image

        item = Image.new("RGB", (256, 256), (128, 128, 128)) if self.modality == "image" else "a photo"
        batch = self.preprocess([item])
        hs = self._hidden_states(batch)
        shapes = [tuple(h.shape) for h in hs]
        if all(len(s) == 4 for s in shapes):
            self.kind, self.n_prefix = "cnn", 0
            self.dims = [s[1] for s in shapes]
            self.poolings, self.default_pooling = ("avg",), "avg"
        elif all(len(s) == 3 for s in shapes):
            self.dims = [s[-1] for s in shapes]
            if self.modality == "text":
                self.kind, self.n_prefix = "text", 0
                self.poolings = ("mean", "eos") if self.causal else ("mean", "cls")
                self.default_pooling = "mean"
            else:
                self.kind = "vision"
                self.n_prefix = self._prefix_tokens(batch, shapes)
                if self.n_prefix >= 1:
                    self.poolings, self.default_pooling = ("cls", "mean"), "cls"
                else:
                    self.poolings, self.default_pooling = ("mean",), "mean"
        else:
            raise StratalignError(f"{self.spec}: hidden states of mixed or unexpected shapes {shapes}; "
                                  "not a model stratalign can pool")
        self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(1, len(hs))]
        self.blocks = self._find_blocks()
        self.forward_calls = 0

    def _find_blocks(self) -> list[torch.nn.Module] | None:
        """The transformer blocks whose outputs are hidden states 1..n (a ModuleList of n blocks: BERT's
        `encoder.layer`, CLIP's `encoder.layers`, ...), so `forward_layer` can stop after block L; None for
        CNN backbones (their hidden states are stage outputs) or when no such list is found."""
        n = len(self.layer_names) - 1
        if self.kind == "cnn" or n < 1:
            return None
        for _, module in self.model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n:
                return list(module)
        return None

    @property
    def truncates(self) -> bool:  # type: ignore[override]
        return self.blocks is not None

    def _prefix_tokens(self, batch: dict[str, torch.Tensor], shapes: list[tuple[int, ...]]) -> int:
        tokens = {s[1] for s in shapes}
        cfg = getattr(self.model, "config", None)
        patch = getattr(cfg, "patch_size", None)
        if len(tokens) != 1:
            return 0  # hierarchical (Swin-like): no class token
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        pv = batch.get("pixel_values")
        if not isinstance(patch, int) or pv is None or pv.ndim != 4:
            return 1
        n_patches = (pv.shape[-2] // patch) * (pv.shape[-1] // patch)
        prefix = tokens.pop() - n_patches
        return prefix if prefix >= 0 else 1

    # --- interface ---------------------------------------------------------------------------------
    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        if not items:
            raise StratalignError("preprocess got an empty batch")
        if self.modality == "text":
            # one tokenizer behind a lock: a fast tokenizer's padding/truncation state is not safe to share
            # between loader threads, and a per-thread deep copy cost more (0.15 s each) than a batch's
            # tokenisation (~2 ms for 32 captions)
            with self._tok_lock:
                enc = self.tokenizer([str(t) for t in items], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            return {k: enc[k] for k in self._text_keys if k in enc}
        images = [im.convert("RGB") for im in items]
        if self.image_transform is not None:
            return {"pixel_values": self.image_transform(images)}
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()}

    def _own_bf16(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this forward takes the model's own bf16 path (a CPU bf16 autocast is on, pixels only)."""
        return self.bf16_path is not None and set(batch) == {"pixel_values"} and dinov2_bf16.bf16_autocast_on(self.device)

    def _hidden_states(self, batch: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        batch = to_device(batch, self.device)
        with torch.inference_mode():
            self.forward_calls += 1
            if self._own_bf16(batch):
                return self.bf16_path.hidden_states(batch["pixel_values"])
            out = self.model(**batch, output_hidden_states=True, return_dict=True)
        hs = out.get("hidden_states") if hasattr(out, "get") else getattr(out, "hidden_states", None)
        if not hs:
            raise StratalignError(f"{self.spec}: {type(self.model).__name__} returned no hidden states with "
                                  "output_hidden_states=True, so its layers cannot be extracted")
        return hs

    def forward_pooled(self, batch: dict[str, torch.Tensor], poolings: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        poolings = self.check_poolings(poolings)
        with torch.inference_mode():
            hs = self._hidden_states(batch)
            if len(hs) != len(self.layer_names):
                raise StratalignError(f"{self.spec}: got {len(hs)} hidden states, expected {len(self.layer_names)}")
            mask = batch.get("attention_mask")
            if mask is not None:
                mask = mask.to(self.device)
            return pool_layers(hs, poolings, kind=self.kind, attention_mask=mask, n_prefix=self.n_prefix)

    def forward_layer(self, batch: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
        """Hidden state `layer` pooled, running blocks 1..layer only: a hook on block `layer` (or on the input
        of block 1 for the embeddings) stops the forward pass, so the later blocks and the final norm never
        run. hidden_states[L] is block L's output (the input of block L+1), as `output_hidden_states` gives it."""
        pooling = self.check_layer(layer, pooling)
        if self.blocks is None:
            return super().forward_layer(batch, layer, pooling)
        if self._own_bf16(batch):  # the same numbers as forward_pooled's bf16 path, blocks 1..layer only
            with torch.inference_mode():
                self.forward_calls += 1
                hs = self.bf16_path.hidden_states(to_device(batch, self.device)["pixel_values"], n_blocks=layer)
                return pool_layers(hs[layer:], [pooling], kind=self.kind, n_prefix=self.n_prefix)[pooling][0]
        seen: list[torch.Tensor] = []

        def before_first(module: Any, args: tuple, kwargs: dict) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise LayerReached

        def after(module: Any, args: tuple, output: Any) -> None:
            seen.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise LayerReached

        handle = (self.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True) if layer == 0
                  else self.blocks[layer - 1].register_forward_hook(after))
        batch = to_device(batch, self.device)
        try:
            with torch.inference_mode():
                self.forward_calls += 1
                try:
                    self.model(**batch, return_dict=True)
                except LayerReached:
                    pass
                if not seen:
                    raise StratalignError(f"{self.spec}: the forward pass never reached block {layer}")
                mask = batch.get("attention_mask")
                return pool_layers(seen[:1], [pooling], kind=self.kind, attention_mask=mask,
                                   n_prefix=self.n_prefix)[pooling][0]
        finally:
            handle.remove()

    def metadata(self) -> dict[str, Any]:
        meta = self.base_metadata()
        meta.update({"weights_sha256": self._weights_sha, "preprocessing": self._preprocessing,
                     "prefix_tokens": self.n_prefix if self.kind == "vision" else None})
        meta.update(self._extra)
        return meta


def _processor_description(processor: Any) -> dict[str, Any]:
    keys = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "resample", "do_convert_rgb")
    desc: dict[str, Any] = {"image_processor": type(processor).__name__}
    for k in keys:
        v = getattr(processor, k, None)
        if v is None:
            continue
        if hasattr(v, "items"):
            v = dict(v.items())
        elif isinstance(v, tuple):
            v = list(v)
        elif not isinstance(v, (int, float, str, bool, list)):
            v = int(v) if hasattr(v, "__int__") else str(v)
        desc[k] = v
    return desc


def _weights(from_pretrained: Any, ident: str) -> Any:
    """A model's weights through `from_pretrained`; weights that will not load as plain tensors (a pickled
    checkpoint with code in it, a damaged file) are one line naming the folder, never a traceback. transformers'
    "Loading weights" bar is off meanwhile (it filled every log of embed, search, serve), then as it was."""
    from transformers.utils import logging as hf_logging

    was_on, _ = hf_logging.is_progress_bar_enabled(), hf_logging.disable_progress_bar()
    try:
        return from_pretrained(ident)
    except StratalignError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers and torch raise many types; one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise StratalignError(f"cannot load the weights of {ident!r} ({type(e).__name__}: {first[:160]}); only "
                              "safetensors or weights-only checkpoints load: convert or replace the model files") from None
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_hf(spec: str, device: str = "cpu", *, canonical: str | None = None, max_length: int | None = None,
            extra_metadata: dict[str, Any] | None = None) -> HFEncoder:
    """Load `hf:<ident>[:image|:text]` (or a named encoder that is an HF folder, via `canonical`)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    ident, tower = parse_hf_spec(spec)
    try:
        cfg = AutoConfig.from_pretrained(ident)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; one line for the user
        raise StratalignError(f"cannot load a transformers config from {ident!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); offline, use a local model folder") from e
    dual = _is_dual(cfg)
    if dual:
        tower = tower or "image"
        modality = tower
        names = DUAL_TOWER_CLASSES.get(cfg.model_type)
        if names is not None:
            model = _weights(getattr(transformers, names[0 if tower == "image" else 1]).from_pretrained, ident)
        else:
            full = _weights(AutoModel.from_pretrained, ident)
            model = getattr(full, "vision_model" if tower == "image" else "text_model", None)
            if model is None:
                raise StratalignError(f"{ident}: a two-tower {cfg.model_type} model without a "
                                      f"{'vision_model' if tower == 'image' else 'text_model'} submodule")
        sub_cfg = cfg.vision_config if tower == "image" else cfg.text_config
    else:
        modality = _config_modality(cfg)
        if tower is not None and tower != modality:
            raise StratalignError(f"{ident} is a {modality} model, not {tower}")
        model = _weights(AutoModel.from_pretrained, ident)
        sub_cfg = cfg
    canonical_spec = canonical or ("hf:" + ident + (f":{tower}" if dual else ""))

    tokenizer = image_processor = None
    if modality == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ident)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        max_length = max_length or _max_text_length(tokenizer, sub_cfg)
        preprocessing = {"tokenizer": type(tokenizer).__name__, "max_length": max_length, "padding": "longest",
                         "truncation": True}
    else:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(ident)
        preprocessing = _processor_description(image_processor)

    sha = weights_hash(ident, model, getattr(cfg, "_commit_hash", None))
    causal = modality == "text" and (getattr(sub_cfg, "model_type", "") in CAUSAL_TEXT_TYPES
                                    or bool(getattr(sub_cfg, "is_decoder", False)))
    extra = {"source": ident, "library": "transformers"}
    extra.update(extra_metadata or {})
    return HFEncoder(canonical_spec, model, modality, tokenizer=tokenizer, image_processor=image_processor,
                     max_length=max_length, causal=causal, weights_sha=sha, preprocessing=preprocessing,
                     extra_metadata=extra, device=device)
