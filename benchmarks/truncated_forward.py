"""Truncated forward (`Encoder.forward_layer`, what AlignedModel runs) vs the full forward (`forward_pooled`, what
extraction runs), on random-init HF models: a ViT-B-like vision model and a BERT-base-like text model (12
blocks each), and the packaged minilm-l6 / efficientnet-lite0. Prints the time ratio truncated / full per layer
depth beside the fraction of blocks run (the goal: proportional to the layers run). Times are CPU seconds of
this process (see `_paired`).

    python benchmarks/truncated_forward.py [--repeats 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stratalign.encoders import load_encoder


def _models(folder: Path) -> list[tuple[str, str]]:
    import transformers as tf

    torch.manual_seed(0)
    vit = folder / "vit"
    tf.ViTModel(tf.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                             image_size=224, patch_size=16)).save_pretrained(vit)
    tf.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vit)
    bert = folder / "bert"
    tok_src = load_encoder("minilm-l6").tokenizer
    tok_src.save_pretrained(bert)
    tf.BertModel(tf.BertConfig(vocab_size=tok_src.vocab_size, hidden_size=384, num_hidden_layers=12,
                               num_attention_heads=6, intermediate_size=1536)).save_pretrained(bert)
    return [("hf:" + str(vit), "image"), ("hf:" + str(bert), "text"), ("minilm-l6", "text"),
            ("efficientnet-lite0", "image")]


def _items(modality: str, n: int) -> list:
    rng = np.random.default_rng(0)
    if modality == "image":
        return [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
    words = "a red heart grinning face with big eyes and a cat on the table under the sun".split()
    return [" ".join(rng.choice(words, size=24)) for _ in range(n)]


def _paired(full, truncated, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` CPU seconds of this process (all torch threads; `time.process_time`) of each, measured
    alternately (full, truncated, full, ...): on a shared, loaded machine wall time mostly measures the other
    processes, CPU time the work done; the minimum is the least disturbed run."""
    full(), truncated()  # warm-up
    tf, tt = [], []
    for _ in range(repeats):
        for fn, out in ((full, tf), (truncated, tt)):
            t0 = time.process_time()
            fn()
            out.append(time.process_time() - t0)
    return min(tf), min(tt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for spec, modality in _models(Path(tmp)):
            enc = load_encoder(spec)
            batch = enc.preprocess(_items(modality, args.batch))
            pooling = enc.default_pooling
            name = spec if not spec.startswith("hf:") else f"random-init HF {'ViT' if modality == 'image' else 'BERT'}"
            n = enc.n_layers
            print(f"\n{name}: {n} layers, batch {args.batch} (truncates: {enc.truncates})")
            print(f"{'layer':>6} {'blocks run':>11} {'full CPU ms':>12} {'truncated CPU ms':>17} {'ratio':>7}")
            for layer in sorted({1, n // 4, n // 2, (3 * n) // 4, n - 1}):
                full, t = _paired(lambda e=enc, b=batch, p=pooling: e.forward_pooled(b, [p]),
                                  lambda e=enc, b=batch, n_=layer, p=pooling: e.forward_layer(b, n_, p), args.repeats)
                print(f"{layer:>6} {f'{layer}/{n - 1}':>11} {1000 * full:>12.1f} {1000 * t:>17.1f} {t / full:>7.2f}")


if __name__ == "__main__":
    main()
