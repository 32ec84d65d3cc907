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


def test_tensors_in_and_out_preprocess_and_tokenizer(hf_store) -> None:
    """open_clip / Hugging Face conventions: a `preprocess` batch (or its pixel tensor) and a `tokenizer` batch
    embed as the raw items do; return_tensors="pt" gives torch tensors of the same numbers."""
    import torch

    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "linear", "last"), device="cpu")
    paths = store.dataset("twemoji").images["path"].to_list()[:3]
    texts = ["a red heart", "a grinning face"]
    z = model.encode_image(paths)
    batch = model.preprocess(paths)
    np.testing.assert_array_equal(model.encode_image(batch), z)
    np.testing.assert_array_equal(model.encode_image(batch["pixel_values"]), z)
    zt = model.encode_text(model.tokenizer(texts), return_tensors="pt")
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_array_equal(zt.numpy(), model.encode_text(texts))
    with pytest.raises(StratalignError, match="return_tensors"):
        model.encode_text(texts, return_tensors="tf")


def test_classify_top_k_probabilities_are_softmax_at_the_training_temperature(hf_store) -> None:
    store, vit, bert = hf_store
    model = AlignedModel.from_run(store, _run(store, vit, bert, "clip", "linear", "last"), device="cpu")
    assert model.temperature == model.card["run_config"]["train"]["tau"] == 0.05
    paths = store.dataset("twemoji").images["path"].to_list()[:4]
    res = model.classify(paths, ["cat", "dog", "red heart", "face"])
    logits = res.scores / 0.05
    expect = np.exp(logits - logits.max(1, keepdims=True))
    expect /= expect.sum(1, keepdims=True)
    np.testing.assert_allclose(res.probs, expect, rtol=1e-5)
    top = res.top(2)
    assert [t[0][0] for t in top] == res.labels and all(t[0][1] >= t[1][1] for t in top)
    assert top[0][0][2] == pytest.approx(float(res.scores[0].max()))


def test_export_carries_a_model_card_and_from_pretrained_is_bit_identical_in_a_new_process(hf_store, tmp_path) -> None:
    store, vit, bert = hf_store
    run_id = _run(store, vit, bert, "clip", "mlp", "1,2")
    model = AlignedModel.from_run(store, run_id, device="cpu")
    out = model.export(tmp_path / "exported")
    readme = (out / "README.md").read_text()
    cfg = model.card["run_config"]
    for needle in (run_id, vit, bert, "| image |", "| 1 (", "| 2 (", cfg["dataset_fingerprint"],
                   f"pairs: {cfg['n_pairs']} ({cfg['n_train']} trained on", "objective `clip`", "- tau: `0.05`",
                   "95% interval (Wilson)", "| t2i_R@1 |", "## Intended use and limits"):
        assert needle in readme, needle
    assert model.export(tmp_path / "again") and (tmp_path / "again" / "README.md").read_text() == readme
    paths = store.dataset("twemoji").images["path"].to_list()[:3]
    code = ("import json, sys, numpy as np\nfrom stratalign.use.model import AlignedModel\n"
            "m = AlignedModel.from_pretrained(sys.argv[1], device='cpu')\n"
            "np.save(sys.argv[2], np.concatenate([m.encode_image(json.loads(sys.argv[3])), m.encode_text(['a cat'])]))\n")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "z.npy"), json.dumps(paths)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"),
                                  np.concatenate([model.encode_image(paths), model.encode_text(["a cat"])]))


def test_an_ambiguous_run_prefix_lists_its_candidates(hf_store) -> None:
    store, vit, bert = hf_store
    a = _run(store, vit, bert, "clip", "linear", "last")
    b = _run(store, vit, bert, "clip", "linear", "1,1")
    common = a[:len(next(p for p in (a[:i] for i in range(len(a), 0, -1)) if b.startswith(p)))]
    with pytest.raises(StratalignError, match="is ambiguous") as err:
        AlignedModel.from_run(store, common)
    assert a in str(err.value) and b in str(err.value) and "give more of the id" in str(err.value)


def test_search_reads_queries_the_store_holds_without_an_encoder(hf_store) -> None:
    """A caption of the dataset (and a file with one of its images' bytes) is answered from the store's cached
    features, with the hits of the encoder path; no encoder is loaded."""
    from stratalign.use.cached import CachedFeatures
    from stratalign.use.search import search

    store, vit, bert = hf_store
    run_id = _run(store, vit, bert, "clip", "linear", "last")
    ds = store.dataset("twemoji")
    caption, path = ds.captions["text"][4], ds.images["path"][4]

    def no_encoder(*_a):
        raise AssertionError("an encoder was loaded")

    fast = AlignedModel.from_run(store, run_id, device="cpu", load=no_encoder)
    cached = CachedFeatures(store, fast, "twemoji")
    by_text = search(store, fast, "twemoji", [caption], 5, cached=cached)[0]
    by_image = search(store, fast, "twemoji", [path], 5, by="image", cached=cached)[0]
    assert cached.hits == 2 and not fast._encoders
    slow = AlignedModel.from_run(store, run_id, device="cpu")
    assert [h.row for h in by_text] == [h.row for h in search(store, slow, "twemoji", [caption], 5)[0]]
    assert [h.row for h in by_image] == [h.row for h in search(store, slow, "twemoji", [path], 5, by="image")[0]]
