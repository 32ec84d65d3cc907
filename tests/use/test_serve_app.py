"""`stratalign serve`'s page: two runs side by side for one query, checked over HTTP and in a real headless
browser (Debian's chromium driven by Playwright; skipped with the reason where either is missing)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest
from aligned_runs import _run, _store
from tiny_models import save_tiny_bert, save_tiny_vit

from stratalign.use.model import AlignedModel

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed: pip install 'stratalign[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
K = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from stratalign.use.serve_app import create_app

    root = tmp_path_factory.mktemp("serve")
    vit, bert = "hf:" + str(save_tiny_vit(root / "vit", "vit")), "hf:" + str(save_tiny_bert(root / "bert"))
    store = _store(root, (vit, bert), 40)
    runs = [_run(store, vit, bert, "clip", "linear", "last"), _run(store, vit, bert, "csa", "csa", "last")]
    models = [AlignedModel.from_run(store, r, device="cpu") for r in runs]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(store, models, "twemoji", K), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store, models
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_shows_each_runs_top_images_for_a_query(server) -> None:
    url, store, models = server
    caption = store.dataset("twemoji").captions["text"][0]
    page = urllib.request.urlopen(f"{url}/?q={urllib.parse.quote(caption)}", timeout=60).read().decode()
    assert page.count('class="run"') == 2 and page.count('class="result"') == 2 * K
    for m in models:
        from stratalign.use.search import search

        top = search(store, m, "twemoji", [caption], K)[0]
        assert f'data-run="{m.run_id}"' in page
        assert all(f'src="/image/{h.row}"' in page for h in top)
    img = urllib.request.urlopen(f"{url}/image/0", timeout=30)
    assert img.headers["content-type"] == "image/png" and img.read()[:4] == b"\x89PNG"


def test_browser_types_a_query_and_sees_images(server) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (extra: browser)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system chromium on PATH (Debian: apt-get install chromium)")
    url, store, _ = server
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
