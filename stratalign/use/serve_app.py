"""The page of `stratalign serve`: a search box and the top images of one or more runs side by side.

A Starlette/FastAPI app over `use.search` (indexes built once at start-up and kept in the store); it only
formats results as HTML. Images are served from the dataset's own files by row (`/image/<row>`), read through
store.media, so the page shows exactly the pixels the model embedded.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>stratalign search</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.runs {{ display: flex; gap: 2em; align-items: flex-start; }}
.run {{ flex: 1; min-width: 0; }}
.run h2 {{ font-size: 1em; word-break: break-all; }}
.hit {{ display: flex; gap: .8em; align-items: center; margin: .3em 0; }}
.hit img {{ width: 72px; height: 72px; object-fit: contain; border: 1px solid #ddd; }}
.score {{ color: #666; font-family: monospace; }}
</style></head>
<body>
<h1>stratalign: search {dataset}</h1>
<form method="get" action="/"><input id="q" name="q" size="50" value="{query}" placeholder="a red heart" autofocus>
<button type="submit">search</button></form>
{body}
</body></html>
"""


def _column(run_id: str, label: str, hits: Sequence[Any]) -> str:
    rows = "".join(
        f'<div class="hit"><span class="rank">{i + 1}</span><img class="result" src="/image/{h.row}" '
        f'alt="{html.escape(h.caption)}"><div><div class="caption">{html.escape(h.caption)}</div>'
        f'<div class="score">{h.score:.4f} &middot; {html.escape(h.image_id)}</div></div></div>'
        for i, h in enumerate(hits))
    return f'<div class="run" data-run="{html.escape(run_id)}"><h2>{html.escape(label)}</h2>{rows}</div>'


def create_app(store: Any, models: Sequence[Any], dataset: str, k: int = 8, split: str | None = None) -> Any:
    """The FastAPI app: GET / (the page; ?q=text searches with every model), GET /image/<row> (an image file)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    from stratalign.errors import StratalignError
    from stratalign.store.media import read_bytes
    from stratalign.use.search import dataset_index, search

    ds = store.dataset(dataset)
    paths = ds.images["path"].to_list()
    for m in models:  # built (or found) once, before the first query
        dataset_index(store, m, dataset, "image", split)
    app = FastAPI(title="stratalign search")

    @app.get("/", response_class=HTMLResponse)
    def page(q: str = "") -> str:
        body = ""
        if q.strip():
            try:
                cols = [_column(m.run_id, f"{m.run_id} ({m.card.get('objective')}, t2i R@1 "
                                          f"{m.card.get('metrics', {}).get('t2i_R@1', float('nan')):.1f}%)",
                                search(store, m, dataset, [q], k, split=split)[0]) for m in models]
            except StratalignError as exc:
                cols = [f'<p class="error">{html.escape(str(exc))}</p>']
            body = f'<div class="runs">{"".join(cols)}</div>'
        return PAGE.format(dataset=html.escape(dataset), query=html.escape(q), body=body)

    @app.get("/image/{row}")
    def image(row: int) -> Response:
        if not 0 <= row < len(paths):
            raise HTTPException(404, f"no image row {row} in {dataset}")
        path = paths[row]
        kind = "png" if path.lower().endswith(".png") else "jpeg"
        return Response(read_bytes(path), media_type=f"image/{kind}")

    return app
