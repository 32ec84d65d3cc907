"""Tiny random-init Hugging Face models and inputs built on the fly, shared by the encoder, model and serve tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "table", "sits", "big"]


def images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (33, 50), (64, 64), (20, 45)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 4][1], sizes[i % 4][0], 3), dtype=np.uint8))
            for i in range(n)]


TEXTS = ["a photo of the cat", "dog", "a big red dog sits on the blue table"]


class CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(lambda *a: self._inc())

    def _inc(self) -> None:
        self.n += 1


# --- tiny models saved with save_pretrained -------------------------------------------------------
def save_tiny_bert(folder: Path, seed: int = 0, **save_kw) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(vocab_file=str(vocab), model_max_length=16).save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder, **save_kw)
    return folder


def save_tiny_vit(folder: Path, kind: str = "vit") -> Path:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8))
        proc = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               mlp_ratio=2, image_size=56, patch_size=14))
        proc = tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    elif kind == "dinov2_reg":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14,
            num_register_tokens=4))
        proc = tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    elif kind == "clip":
        cfg = tf.CLIPConfig(
            vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "image_size": 32, "patch_size": 8},
            text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 16},
            projection_dim=16)
        model = tf.CLIPModel(cfg)
        proc = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        raise ValueError(kind)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
