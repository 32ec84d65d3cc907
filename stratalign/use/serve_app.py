"""The HTTP face of `stratalign serve`: a JSON API (documented at /openapi.json and /docs) over a warm
`use.service.Service`, and a search page that calls the same API from the browser.

    GET  /api/info                       dataset, limits, served runs (metrics, temperature, gallery size)
    GET  /api/search?q=TEXT&k=8[&run=R]  text -> top-k images per run (ids, scores, captions, image URLs)
    POST /api/search                     the same with a JSON body {"query", "k", "runs"}
    POST /api/search/image?k=8           an uploaded image (the request body: the file's bytes) -> top-k images
    POST /api/classify?k=5[&classes=a,b] an uploaded image -> top-k classes with probabilities per run
    POST /api/embed                      {"texts": [...], "run": R} -> unit embeddings
    GET  /image/<row>                    a gallery image, read through the store's containment rule (403 outside)
    GET  /                               the page (HTML + a script calling /api/search)

Refused input (limits, empty query, unreadable upload) answers 4xx with {"detail": reason}.
"""

from __future__ import annotations

import html
import time
from typing import Any, Awaitable, List, Optional

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from stratalign.errors import StratalignError
from stratalign.store.containment import OutsideRoots
from stratalign.store.media import read_bytes
from stratalign.use.service import Refused, Service


class HitOut(BaseModel):
    rank: int
    row: int = Field(description="image row of the dataset")
    image_id: str
    score: float = Field(description="cosine similarity in the run's space")
    caption: str = Field(description="the image's first caption")
    image_url: str


class RunHits(BaseModel):
    run_id: str
    objective: Optional[str] = None
    hits: List[HitOut]


class SearchOut(BaseModel):
    query: Optional[str] = None
    k: int
    results: List[RunHits]


class SearchIn(BaseModel):
    query: str
    k: int = 8
    runs: Optional[List[str]] = None


class ClassOut(BaseModel):
    label: str
    probability: float = Field(description="softmax of the cosines at the run's training temperature")
    score: float = Field(description="cosine similarity to the class embedding")


class ClassifyOut(BaseModel):
    run_id: str
    temperature: float
    top: List[ClassOut]


class EmbedIn(BaseModel):
    texts: List[str]
    run: Optional[str] = None


class EmbedOut(BaseModel):
    run_id: str
    dim: int
    embeddings: List[List[float]]


class RunInfo(BaseModel):
    run_id: str
    objective: Optional[str] = None
    head: Optional[str] = None
    dim: int
    temperature: float
    classes: int
    metrics: dict[str, float]
    index_source: str
    gallery: int
    text_query_path: str = Field(description="onnx (use.fast, no torch) or torch")
    text_batches: int = Field(description="text batches encoded since start-up (concurrent queries share one)")
    text_queries: int = Field(description="text queries in the last 1,000 of those batches")


class InfoOut(BaseModel):
    dataset: str
    split: Optional[str] = None
    images: int
    limits: dict[str, int]
    runs: List[RunInfo]


class ErrorOut(BaseModel):
    detail: str


UPLOAD = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary"}}, "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
RUNS = Query(None, description="served run ids or prefixes (default: all)")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorOut} for c in (403, 404, 413, 422)}


async def timed(answer: Awaitable[dict[str, Any]]) -> JSONResponse:
    """The answer as JSON (built by the service from plain types: SearchOut documents it, nothing re-validates it),
    with its time in the service (waiting for its batch, encoding, searching, the answer's dict) as a
    `Server-Timing: search;dur=<ms>` header: what the server spends per request, beside what a client measures."""
    start = time.perf_counter()
    out = await answer
    return JSONResponse(out, headers={"Server-Timing": f"search;dur={1000 * (time.perf_counter() - start):.2f}"})


def create_app(service: Service, k: int = 8) -> FastAPI:
    """The app over a warm service; `k`: the page's results per run."""
    app = FastAPI(title="stratalign search", version="1",
                  description=f"Search dataset {service.dataset!r} with {len(service.runs)} aligned run(s).")

    @app.exception_handler(Refused)
    def refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StratalignError)
    def failed(_: Request, exc: StratalignError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def body(request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes the upload limit."""
        limit = service.limits.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"upload is {declared} bytes, more than the {limit} allowed")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"upload is more than the {limit} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/api/info", response_model=InfoOut)
    def info() -> Any:
        return service.describe()

    @app.get("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search_get(q: str, k: int = k, run: Optional[List[str]] = RUNS) -> Any:
        return await timed(service.search_text_async(q, k, run))

    @app.post("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search_post(req: SearchIn) -> Any:
        return await timed(service.search_text_async(req.query, req.k, req.runs))

    @app.post("/api/search/image", response_model=SearchOut, responses=ERRORS, openapi_extra=UPLOAD)
    async def search_image(request: Request, k: int = k, run: Optional[List[str]] = RUNS) -> Any:
        data = await body(request)
        return await run_in_threadpool(service.search_image, data, k, run)

    @app.post("/api/classify", response_model=List[ClassifyOut], responses=ERRORS, openapi_extra=UPLOAD)
    async def classify(request: Request, k: int = 5, classes: Optional[str] = None,
                       run: Optional[List[str]] = RUNS) -> Any:
        data = await body(request)
        names = classes.split(",") if classes is not None else None
        return await run_in_threadpool(service.classify, data, k, names, run)

    @app.post("/api/embed", response_model=EmbedOut, responses=ERRORS)
    def embed(req: EmbedIn) -> Any:
        return service.embed_texts(req.texts, req.run)

    @app.get("/image/{row}", responses={200: {"content": {"image/*": {}}}, **ERRORS})
    def image(row: int) -> Response:
        if not 0 <= row < len(service.gallery.ids):
            raise HTTPException(404, f"no image row {row} in {service.dataset}")
        try:
            path = service.image_path(row)
            data = read_bytes(path)
        except OutsideRoots as exc:
            raise HTTPException(403, str(exc)) from None
        except OSError as exc:
            raise HTTPException(404, f"image row {row} cannot be read ({type(exc).__name__})") from None
        kind = "png" if path.lower().endswith(".png") else "jpeg"
        return Response(data, media_type=f"image/{kind}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(q: str = "") -> str:
        return PAGE.replace("{dataset}", html.escape(service.dataset)).replace("{query}", html.escape(q)) \
            .replace("{k}", str(int(k)))

    return app


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>stratalign search</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
.runs { display: flex; gap: 2em; align-items: flex-start; }
.run { flex: 1; min-width: 0; }
.run h2 { font-size: 1em; word-break: break-all; }
.hit { display: flex; gap: .8em; align-items: center; margin: .3em 0; }
.hit img { width: 72px; height: 72px; object-fit: contain; border: 1px solid #ddd; }
.score { color: #666; font-family: monospace; }
.error { color: #a00; }
</style></head>
<body>
<h1>stratalign: search {dataset}</h1>
<form id="form" method="get" action="/"><input id="q" name="q" size="50" value="{query}" placeholder="a red heart"
autofocus> <button type="submit">search</button> <a href="/docs">API</a></form>
<div id="results"></div>
<script>
const K = {k};
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [a, v] of Object.entries(attrs || {})) e.setAttribute(a, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
async function run(q) {
  const out = document.getElementById("results");
  out.replaceChildren();
  if (!q.trim()) return;
  const res = await fetch("/api/search?" + new URLSearchParams({q: q, k: K}));
  const data = await res.json();
  if (!res.ok) { out.append(el("p", {class: "error"}, data.detail)); return; }
  const runs = el("div", {class: "runs"});
  for (const r of data.results) {
    const col = el("div", {class: "run", "data-run": r.run_id});
    col.append(el("h2", {}, r.run_id + " (" + r.objective + ")"));
    for (const h of r.hits) {
      const hit = el("div", {class: "hit"});
      hit.append(el("span", {class: "rank"}, String(h.rank)));
      hit.append(el("img", {class: "result", src: h.image_url, alt: h.caption}));
      const text = el("div");
      text.append(el("div", {class: "caption"}, h.caption));
      text.append(el("div", {class: "score"}, h.score.toFixed(4) + " \\u00b7 " + h.image_id));
      hit.append(text);
      col.append(hit);
    }
    runs.append(col);
  }
  out.append(runs);
}
document.getElementById("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q").value;
  history.replaceState(null, "", "/?" + new URLSearchParams({q: q}));
  run(q);
});
run(document.getElementById("q").value);
</script>
</body></html>
"""
