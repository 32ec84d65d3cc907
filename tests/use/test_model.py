"""AlignedModel: embedding a dataset's own images and captions equals the cached-feature path (store features ->
heads) within float16 storage rounding, for every head kind, on random-init HF models built here and on the
packaged minilm-l6 / efficientnet-lite0; export -> load in a new process without the store; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aligned_runs import _run, _store
from tiny_models import save_tiny_bert, save_tiny_vit

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore
from stratalign.use.model import AlignedModel

ROOT = Path(__file__).resolve().parents[2]
# (objective, head): every head kind a run can have
KINDS = [("clip", "linear"), ("clip", "mlp"), ("clip", "residual"), ("clip+vib", "linear"), ("csa", "csa"),
         ("comm", "linear")]
TOL = 3e-3  # |cached - fresh| on unit embeddings: a feature differing by one float16 step (2^-11 relative)


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned_hf")
    vit = save_tiny_vit(root / "vit", "vit")
    bert = save_tiny_bert(root / "bert")
    return _store(root, ("hf:" + str(vit), "hf:" + str(bert)), 200), "hf:" + str(vit), "hf:" + str(bert)


def _cached(store: FeatureStore, model: AlignedModel, modality: str, rows: np.ndarray) -> np.ndarray:
    tower = model.towers[modality]
    x = store.entry(model.card["towers"][modality]["entry"]).read_layer(tower.layer, rows).astype(np.float32)
    return model.encode_features(x, modality)


def _assert_same_as_cached(store: FeatureStore, model: AlignedModel, n: int = 12) -> None:
    ds = store.dataset("twemoji")
    rows = np.arange(n)
    paths = ds.images["path"].to_list()[:n]
    texts = ds.captions["text"].to_list()[:n]
    if model.is_fusion:
        fresh = model.encode_pairs(paths, texts)
        from stratalign.train import fused_features

        x_img = store.entry(model.card["towers"]["image"]["entry"]).read_layer(model.towers["image"].layer, rows)
        x_txt = store.entry(model.card["towers"]["text"]["entry"]).read_layer(model.towers["text"].layer, rows)
        cached = fused_features(model.model, x_img.astype(np.float32), x_txt.astype(np.float32))
        np.testing.assert_allclose(fresh, cached, atol=TOL * np.abs(cached).max())
    for modality, items in (("image", paths), ("text", texts)):
        fresh = model.encode_image(items) if modality == "image" else model.encode_text(items)
        cached = _cached(store, model, modality, rows)
        assert fresh.shape == cached.shape and fresh.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
        assert np.abs(fresh - cached).max() < TOL, (modality, np.abs(fresh - cached).max())


@pytest.mark.parametrize("objective,head", KINDS)
def test_every_head_kind_embeds_as_the_cached_path(hf_store, objective: str, head: str) -> None:
    store, vit, bert = hf_store
    run_id = _run(store, vit, bert, objective, head, layers="1,1")  # middle layers: the forward is cut there
    model = AlignedModel.from_run(store, run_id[:-4], device="cpu")
    assert model.run_id == run_id and (model.towers["image"].layer, model.towers["text"].layer) == (1, 1)
    _assert_same_as_cached(store, model)
    sim = model.similarity(store.dataset("twemoji").images["path"].to_list()[:3], ["a cat", "a dog"])
    assert sim.shape == (3, 2) and np.all(np.abs(sim) <= 1 + 1e-5)
    if model.is_fusion:
        with pytest.raises(StratalignError, match="CoMM fusion model"):
            model.classify(store.dataset("twemoji").images["path"].to_list()[:2], ["a", "b"])


def test_classify_is_argmax_over_class_embeddings(hf_store) -> None:
    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "linear", "last"), device="cpu")
    paths = store.dataset("twemoji").images["path"].to_list()[:5]
    res = model.classify(paths, ["cat", "dog", "red heart"], templates=["a {}", "an emoji of {}."])
    classes, emb = model.class_embeddings(["cat", "dog", "red heart"], ["a {}", "an emoji of {}."])
    scores = model.encode_image(paths) @ emb.T
    np.testing.assert_allclose(res.scores, scores, atol=1e-6)
    assert res.labels == [classes[i] for i in scores.argmax(1)]
    assert model.class_prompts()[1] == ["an emoji of {}."]  # the dataset's own templates by default
    with pytest.raises(StratalignError, match="has no"):
        model.classify(paths, ["cat"], templates=["no slot"])


def test_inputs_paths_pil_arrays_agree_and_bad_input_is_one_line(hf_store) -> None:
    from PIL import Image

    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "linear", "last"), device="cpu")
    path = store.dataset("twemoji").images["path"].to_list()[0]
    by_path = model.encode_image([path])
    pil = Image.open(path)  # a palette PNG with transparency: it goes on white like the files extraction read
    np.testing.assert_array_equal(model.encode_image([pil]), by_path)
    np.testing.assert_array_equal(model.encode_image(np.asarray(pil.convert("RGBA"))), by_path)
    for bad, msg in (([str(Path(path).parent / "missing.png")], "cannot be read"), ([], "no images"),
                     ([3], "give a path")):
        with pytest.raises(StratalignError, match=msg):
            model.encode_image(bad)
    with pytest.raises(StratalignError, match="empty"):
        model.encode_text(["  "])


def test_real_named_encoders_embed_as_the_cached_path(tmp_path: Path) -> None:
    store = _store(tmp_path, ("efficientnet-lite0", "minilm-l6"), 24)
    for objective, head, layers in (("clip", "linear", "9,3"), ("csa", "csa", "last")):
        model = AlignedModel.from_run(store, _run(store, "efficientnet-lite0", "minilm-l6", objective, head, layers),
                                      device="cpu")
        assert model.encoder("image").truncates and model.encoder("text").truncates
        _assert_same_as_cached(store, model, n=8)


def test_export_load_in_a_new_process_gives_the_same_embeddings(hf_store, tmp_path: Path) -> None:
    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "mlp", "1,2"), device="cpu")
    out = model.export(tmp_path / "exported")
    card = json.loads((out / "model.json").read_text())
    assert card["towers"]["image"]["layer"] == 1 and card["towers"]["text"]["layer"] == 2
    assert card["towers"]["image"]["encoder_metadata"]["weights_sha256"]
    paths = store.dataset("twemoji").images["path"].to_list()[:4]
    texts = ["a red heart", "a grinning face"]
    code = ("import json, sys, numpy as np\nfrom stratalign.use.model import AlignedModel\n"
            "m = AlignedModel.load(sys.argv[1], device='cpu')\n"
            "z = [m.encode_image(json.loads(sys.argv[3])), m.encode_text(json.loads(sys.argv[4]))]\n"
            "np.save(sys.argv[2], np.concatenate(z))\n")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "z.npy"), json.dumps(paths),
                          json.dumps(texts)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    here = np.concatenate([model.encode_image(paths), model.encode_text(texts)])
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), here)


def test_weights_mismatch_is_refused_with_one_line(hf_store, tmp_path: Path) -> None:
    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "linear", "last"), device="cpu")
    out = model.export(tmp_path / "exp")
    card = json.loads((out / "model.json").read_text())
    card["towers"]["image"]["encoder_metadata"]["weights_sha256"] = "0" * 64
    (out / "model.json").write_text(json.dumps(card))
    other = AlignedModel.load(out, device="cpu")
    with pytest.raises(StratalignError, match="trained on 000000000000") as err:
        other.encode_image(store.dataset("twemoji").images["path"].to_list()[:1])
    assert "\n" not in str(err.value)
    heads = out / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-1] + b" ")
    with pytest.raises(StratalignError, match="heads were changed"):
        AlignedModel.load(out)
    with pytest.raises(StratalignError, match="not an exported model"):
        AlignedModel.load(tmp_path / "nothing")
