"""`stratalign serve`'s API and page: JSON search (text, image upload), classify with probabilities, embed,
limits refused with 4xx and a reason, /openapi.json, the warm service (nothing reloaded per request, concurrent
queries batched), checked over HTTP, and the page in a real headless browser (Debian's chromium driven by
Playwright; skipped with the reason where either is missing)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from aligned_runs import _run, _store
from serve_client import serve_in_thread
from tiny_models import save_tiny_bert, save_tiny_vit

from stratalign.use.model import AlignedModel

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed: pip install 'stratalign[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
K = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from stratalign.use.serve_app import create_app
    from stratalign.use.service import Limits, Service

    root = tmp_path_factory.mktemp("serve")
    vit, bert = "hf:" + str(save_tiny_vit(root / "vit", "vit")), "hf:" + str(save_tiny_bert(root / "bert"))
    store = _store(root, (vit, bert), 40)
    runs = [_run(store, vit, bert, "clip", "linear", "last"), _run(store, vit, bert, "csa", "csa", "last")]
    models = [AlignedModel.from_run(store, r, device="cpu") for r in runs]
    service = Service(store, models, "twemoji", limits=Limits(max_query_chars=50, max_k=20, max_upload_bytes=50_000,
                                                                max_texts=4))
    url, srv, thread = serve_in_thread(create_app(service, K))
    yield url, store, models, service
    srv.should_exit = True
    thread.join(timeout=10)


def get(url: str, data: bytes | None = None, json_body: object = None) -> tuple[int, object]:
    headers = {}
    if json_body is not None:
        data, headers = json.dumps(json_body).encode(), {"content-type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            body = res.read()
            return res.status, json.loads(body) if res.headers["content-type"] == "application/json" else body
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_openapi_documents_the_json_api(server) -> None:
    url, *_ = server
    status, spec = get(f"{url}/openapi.json")
    assert status == 200
    assert {"/api/search", "/api/search/image", "/api/classify", "/api/embed", "/api/info", "/image/{row}"} <= set(spec["paths"])
    assert "requestBody" in spec["paths"]["/api/classify"]["post"]
    assert get(f"{url}/docs")[0] == 200


def test_json_text_search_returns_each_runs_top_images(server) -> None:
    from stratalign.use.search import search

    url, store, models, _ = server
    caption = store.dataset("twemoji").captions["text"][0]
    status, out = get(f"{url}/api/search?{urllib.parse.urlencode({'q': caption, 'k': K})}")
    assert status == 200 and out["query"] == caption and len(out["results"]) == 2
    for m, res in zip(models, out["results"]):
        top = search(store, m, "twemoji", [caption], K)[0]
        assert res["run_id"] == m.run_id
        assert [h["row"] for h in res["hits"]] == [h.row for h in top]
        np.testing.assert_allclose([h["score"] for h in res["hits"]], [h.score for h in top], atol=1e-5)
        assert all(h["image_url"] == f"/image/{h['row']}" and h["caption"] for h in res["hits"])
    status, posted = get(f"{url}/api/search", json_body={"query": caption, "k": K, "runs": [models[1].run_id[:8]]})
    assert status == 200 and [r["run_id"] for r in posted["results"]] == [models[1].run_id]
    assert posted["results"][0]["hits"] == out["results"][1]["hits"]
    status, img = get(f"{url}{out['results'][0]['hits'][0]['image_url']}")
    assert status == 200 and img[:4] == b"\x89PNG"
    page = urllib.request.urlopen(url + "/", timeout=30).read().decode()
    assert 'fetch("/api/search?"' in page  # the page uses the same API


def test_image_upload_search_and_classify_with_probabilities(server) -> None:
    url, store, models, _ = server
    ds = store.dataset("twemoji")
    path = ds.images["path"][5]
    data = Path(path).read_bytes()
    status, out = get(f"{url}/api/search/image?k=2", data=data)
    assert status == 200
    for m, res in zip(models, out["results"]):
        q = m.encode_image([path])
        assert res["hits"][0]["row"] == int(np.argmax(q @ m.encode_image(ds.images["path"].to_list()).T))
    status, out = get(f"{url}/api/classify?k=2&classes=cat,dog,red%20heart", data=data)
    assert status == 200 and len(out) == 2
    for m, res in zip(models, out):
        expect = m.classify([path], ["cat", "dog", "red heart"])
        top = expect.top(2)[0]
        assert res["temperature"] == m.temperature
        assert [c["label"] for c in res["top"]] == [c for c, _, _ in top]
        np.testing.assert_allclose([c["probability"] for c in res["top"]], [p for _, p, _ in top], atol=1e-5)
    status, out = get(f"{url}/api/classify?k=5", data=data)  # the run's dataset's classes by default
    assert status == 200 and out[0]["top"][0]["label"] in ds.class_names
    assert abs(sum(c["probability"] for c in out[0]["top"]) - 1) < 1e-4 or len(ds.class_names) > 5


def test_embed_texts_equals_the_model(server) -> None:
    url, _, models, _ = server
    status, out = get(f"{url}/api/embed", json_body={"texts": ["a cat", "a red heart"], "run": models[0].run_id})
    assert status == 200 and out["dim"] == models[0].dim
    np.testing.assert_allclose(out["embeddings"], models[0].encode_text(["a cat", "a red heart"]), atol=1e-6)


@pytest.mark.parametrize("request_, status, reason", [
    ("/api/search?q=a&k=0", 422, "k must be between 1 and 20"),
    ("/api/search?q=a&k=21", 422, "k must be between 1 and 20"),
    ("/api/search?q=%20%20", 422, "empty query"),
    ("/api/search?q=" + "a" * 51, 413, "more than the 50 allowed"),
    ("/api/search?q=a&run=nosuchrun", 404, "not served"),
    ("/image/9999", 404, "no image row 9999"),
    ("POST /api/search/image", 422, "empty upload"),
    ("POST /api/search/image:big", 413, "more than the 50000"),
    ("POST /api/search/image:junk", 422, "not an image"),
    ("POST /api/classify?classes=%2C", 422, "class names"),
    ("POST /api/embed", 413, "give 1 to 4 texts"),
])
def test_input_limits_are_refused_with_4xx_and_a_reason(server, request_, status, reason) -> None:
    url, store, *_ = server
    png = Path(store.dataset("twemoji").images["path"][0]).read_bytes()
    if request_.startswith("POST /api/embed"):
        got = get(f"{url}/api/embed", json_body={"texts": ["a"] * 5})
    elif request_.startswith("POST "):
        path, _, kind = request_[5:].partition(":")
        data = {"": b"", "big": b"x" * 60_000, "junk": b"not an image"}[kind] if kind or "image" in path else png
        got = get(f"{url}{path}", data=data)
    else:
        got = get(url + request_)
    assert got[0] == status and reason in got[1]["detail"], got


def test_the_service_is_warm_and_batches_concurrent_queries(server, monkeypatch) -> None:
    """Encoders, indexes and dataset columns are loaded at start-up: a request reads nothing from the store and
    loads no encoder; 16 concurrent queries (batched, use.batcher) give the answers of 16 sequential ones."""
    url, store, models, service = server
    assert all(set(m._encoders) == {"image", "text"} for m in models)

    def refuse(*_a, **_k):
        raise AssertionError("the store was read during a request")

    monkeypatch.setattr(store, "dataset", refuse)
    monkeypatch.setattr("stratalign.store.indexes.load_index", refuse)
    queries = [f"a {w} face" for w in ("red", "blue", "big", "cat", "dog", "photo", "table", "sits")] * 2
    one = [get(f"{url}/api/search?{urllib.parse.urlencode({'q': q, 'k': 2})}")[1] for q in queries]
    with ThreadPoolExecutor(16) as pool:
        many = list(pool.map(lambda q: get(f"{url}/api/search?{urllib.parse.urlencode({'q': q, 'k': 2})}")[1], queries))
    for a, b in zip(many, one):  # batched with padding: the same hits, scores equal up to float rounding
        assert [[h["row"] for h in r["hits"]] for r in a["results"]] == [[h["row"] for h in r["hits"]] for r in b["results"]]
        np.testing.assert_allclose([h["score"] for r in a["results"] for h in r["hits"]],
                                   [h["score"] for r in b["results"] for h in r["hits"]], atol=1e-5)


def test_text_queries_run_the_onnx_graphs_and_report_server_timing(server) -> None:
    """On the CPU a served text query runs the run's ONNX text tower and head (use.fast), not the torch encoder; each
    search answer says how long the service took (Server-Timing)."""
    from stratalign.use.fast import QueryModel

    url, _, models, service = server
    before = [m.encoder("text").forward_calls for m in models]
    with urllib.request.urlopen(f"{url}/api/search?{urllib.parse.urlencode({'q': 'a blue table', 'k': 2})}",
                                timeout=60) as res:
        timing = res.headers["Server-Timing"]
        assert res.status == 200 and len(json.loads(res.read())["results"]) == 2
    assert timing.startswith("search;dur=") and float(timing.split("=")[1]) > 0
    for m, calls in zip(models, before):
        view = service.runs[m.run_id]
        assert isinstance(view.query, QueryModel) and view.query.runs_onnx("text") and view.query.runs_onnx("head:text")
        assert m.encoder("text").forward_calls == calls
    status, info = get(f"{url}/api/info")
    assert status == 200 and all(r["text_query_path"] == "onnx" and r["text_batches"] >= 1 for r in info["runs"])


def test_browser_types_a_query_and_sees_images(server) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (extra: browser)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system chromium on PATH (Debian: apt-get install chromium)")
    url, store, _, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#q", "a grinning face")
            page.press("#q", "Enter")
            page.wait_for_selector("img.result")
            page.wait_for_function(f"Array.from(document.querySelectorAll('img.result')).filter(i => i.complete && "
                                   f"i.naturalWidth > 0).length == {2 * K}", timeout=30_000)
            assert page.locator(".run").count() == 2
            assert page.input_value("#q") == "a grinning face"
        finally:
            browser.close()
