"""`stratalign search`: text -> a dataset's images, or an image -> its captions, in a run's space."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption


def search_cmd(
    query: Optional[str] = typer.Argument(None, help="The text to search images with."),
    run: str = typer.Option(..., "--run", help="Run id (or a unique prefix)."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset to search (its index is built once and kept)."),
    image: Optional[str] = typer.Option(None, "--image", help="Search the captions with this image instead."),
    k: int = typer.Option(10, "-k", help="How many results."),
    split: Optional[str] = typer.Option(None, "--split", help="Search one split only (train | val | test)."),
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Print the top-k results: rank, score, image id, path and caption."""
    from stratalign.cli.common import plain_columns
    from stratalign.cli.model_opts import open_model
    from stratalign.errors import StratalignError
    from stratalign.use.search import search

    if (query is None or not query.strip()) and image is None:
        raise StratalignError("empty query: give a text, or --image PATH")
    if query is not None and image is not None:
        raise StratalignError("give a text query or --image, not both")
    m, fs = open_model(run, None, store, device, mode="a")
    by = "image" if image is not None else "text"
    hits = search(fs, m, dataset, [image if image is not None else query], k, by=by, split=split)[0]
    rows = [[str(i + 1), f"{h.score:.4f}", h.image_id, h.path, h.caption] for i, h in enumerate(hits)]
    console.out(plain_columns(["rank", "score", "image", "path", "caption"], rows), highlight=False)
