"""use.fast.QueryModel: a run's text queries through ONNX graphs exported once into the store answer as the torch
AlignedModel does (same top-k, scores within float16 rounding), the first run (which exports) and later runs
(which read the store) bit for bit alike; later CLI searches import neither torch nor transformers; what has no
graph (a CoMM fusion run, a damaged cache file) is answered by torch or exported again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aligned_runs import _run, _store
from tiny_models import save_tiny_bert, save_tiny_vit

from stratalign.store import onnx_cache
from stratalign.use.fast import QueryModel, head_key, text_tower_key
from stratalign.use.model import AlignedModel
from stratalign.use.search import search

ROOT = Path(__file__).resolve().parents[2]
TOL = 3e-3  # unit embeddings: a pooled feature may round to the neighbouring float16 step (2^-11 relative)
NEW = ["a red dog on the table", "cat", "the big blue photo of a dog sits on a table", "zebra xylophone"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    vit, bert = "hf:" + str(save_tiny_vit(root / "vit", "vit")), "hf:" + str(save_tiny_bert(root / "bert"))
    store = _store(root, (vit, bert), 40)
    # the last layers, and layer 1 of 2 (the graph stops after block 1: the cut of forward_layer)
    return store, {"last": _run(store, vit, bert, "clip", "linear", "last"),
                   "cut": _run(store, vit, bert, "clip", "mlp", "1,1"), "encoders": (vit, bert)}


@pytest.mark.parametrize("which", ["last", "cut"])
def test_onnx_text_queries_equal_the_torch_model_and_later_runs_the_first(runs, which) -> None:
    store, ids = runs
    torch_model = AlignedModel.from_run(store, ids[which], device="cpu")
    first = QueryModel.from_run(store, ids[which])
    captions = store.dataset("twemoji").captions["text"].to_list()[:6]
    texts = NEW + captions
    z_first = first.encode_text(texts)
    assert len(first.exported) == 2  # the text tower and the text head, kept in the store
    np.testing.assert_allclose(z_first, torch_model.encode_text(texts), atol=TOL)
    np.testing.assert_allclose(first.features(texts, "text"), torch_model.features(texts, "text"), rtol=2e-3, atol=1e-4)
    later = QueryModel.from_run(store, ids[which])
    np.testing.assert_array_equal(later.encode_text(texts), z_first)
    assert later.exported == [] and later._fallback is None  # read from the store; the torch model never loaded
    for q in NEW + captions[:2]:  # the search: same top-k rows, scores within rounding
        want = search(store, torch_model, "twemoji", [q], 5)[0]
        got = search(store, later, "twemoji", [q], 5)[0]
        assert [h.row for h in got] == [h.row for h in want], q
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=TOL)


def test_cache_is_keyed_checked_and_a_damaged_graph_is_exported_again(runs) -> None:
    store, ids = runs
    model = QueryModel.from_run(store, ids["last"])
    z = model.encode_text(NEW)
    key = text_tower_key(model.towers["text"])
    files, meta = onnx_cache.load(store, key)
    assert meta["kind"] == "text tower" and meta["checked"]["max_relative_error"] <= meta["checked"]["tolerance"]
    assert set(files) == {"model.onnx", "tokenizer.json"} and b"pickle" not in files["tokenizer.json"]
    cut = QueryModel.from_run(store, ids["cut"])
    assert text_tower_key(cut.towers["text"]) != key  # another layer: another graph
    assert head_key(model.heads, "text") != head_key(cut.heads, "text") != head_key(cut.heads, "image")
    path = Path(store.loc.path("onnx", key, "model.onnx"))
    path.write_bytes(path.read_bytes()[:-100] + b"\0" * 100)  # a damaged graph reads as absent
    assert onnx_cache.load(store, key) is None
    again = QueryModel.from_run(store, ids["last"])
    np.testing.assert_array_equal(again.encode_text(NEW), z)
    assert again.exported == [key] and onnx_cache.load(store, key) is not None


def test_cached_features_need_only_the_head(runs) -> None:
    """A caption the store holds: no text tower is exported or run (use.cached reads the row)."""
    from stratalign.use.cached import CachedFeatures

    store, ids = runs
    fresh = _store_copy(store, ids["last"])
    model = QueryModel.from_run(fresh, ids["last"])
    caption = fresh.dataset("twemoji").captions["text"][3]
    torch_model = AlignedModel.from_run(fresh, ids["last"], device="cpu")
    got = search(fresh, model, "twemoji", [caption], 5, cached=CachedFeatures(fresh, model, "twemoji"))[0]
    want = search(fresh, torch_model, "twemoji", [caption], 5, cached=CachedFeatures(fresh, torch_model, "twemoji"))[0]
    assert [h.row for h in got] == [h.row for h in want]
    assert model.exported == [head_key(model.heads, "text")]


def _store_copy(store, run_id):  # noqa: ANN001, ANN202 - a copy without the onnx/ folder
    import shutil

    from stratalign.store.feature_store import FeatureStore

    src = Path(store.url)
    dst = src.parent / f"copy-{run_id[:8]}"
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx"))
    return FeatureStore.open(str(dst), "a")


def test_a_fusion_run_is_answered_by_torch(runs) -> None:
    store, ids = runs
    comm = _run(store, *ids["encoders"], "comm", "linear", "last")
    model = QueryModel.from_run(store, comm)
    np.testing.assert_allclose(model.encode_text(NEW), AlignedModel.from_run(store, comm, device="cpu").encode_text(NEW),
                               atol=1e-6)
    assert model.exported == [key for key in model.exported if key.startswith("text-")]  # no head graph


def test_a_later_cli_search_imports_no_torch_and_prints_what_the_first_printed(runs) -> None:
    store, ids = runs
    fresh = _store_copy(store, ids["cut"])
    probe = ("import atexit, sys; atexit.register(lambda: print('LOADED', 'torch' in sys.modules, "
             "'transformers' in sys.modules, file=sys.stderr)); from stratalign.cli.main import main; "
             "sys.argv = ['stratalign'] + sys.argv[1:]; main()")
    outs = []
    for query in ("a red dog on the table", "a red dog on the table", fresh.dataset("twemoji").captions["text"][0]):
        res = subprocess.run([sys.executable, "-c", probe, "search", query, "--run", ids["cut"], "--dataset", "twemoji",
                              "-k", "4", "--store", fresh.url], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 0, res.stderr
        outs.append(res)
    assert "exporting the text tower" in outs[0].stderr and "LOADED True True" in outs[0].stderr
    for later in outs[1:]:
        assert "exporting" not in later.stderr and "LOADED False False" in later.stderr, later.stderr
    assert outs[1].stdout == outs[0].stdout


def test_a_crafted_graph_naming_a_file_elsewhere_is_one_line(runs) -> None:
    """A shared store's graph with an initializer stored as external data at /etc/hostname (its sha256 recorded, so
    it reads as intact): onnxruntime refuses the path and the search stops with one line naming the folder."""
    from onnx import TensorProto, helper

    from stratalign.errors import StratalignError

    store, ids = runs
    fresh = _store_copy(store, ids["last"])
    model = QueryModel.from_run(fresh, ids["last"])
    key = head_key(model.heads, "text")
    weight = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "/etc/hostname"), ("length", "4")):
        weight.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "crafted", [],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])], initializer=[weight])
    crafted = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_cache.save(fresh, key, {"model.onnx": crafted.SerializeToString()}, {"kind": "head", "checked": {}})
    caption = fresh.dataset("twemoji").captions["text"][3]
    from stratalign.use.cached import CachedFeatures

    with pytest.raises(StratalignError, match=rf"onnx/{key} does not load .*remove that folder") as err:
        search(fresh, model, "twemoji", [caption], 5, cached=CachedFeatures(fresh, model, "twemoji"))
    assert "\n" not in str(err.value)
