"""`stratalign search`: text -> a dataset's images, or an image -> its captions, in a run's space."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console


def search_cmd(
    query: Optional[str] = typer.Argument(None, help="The text to search images with."),
    run: str = typer.Option(..., "--run", help="Run id (or a unique prefix)."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset to search (its index is built once and kept)."),
    image: Optional[str] = typer.Option(None, "--image", help="Search the captions with this image instead."),
    k: int = typer.Option(10, "-k", help="How many results (1..1000)."),
    split: Optional[str] = typer.Option(None, "--split", help="Search one split only (train | val | test)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu: the ONNX graphs on the CPU (see below); "
                               "cuda[:i]: the torch model on a GPU."),
    store: Optional[str] = StoreOption,
) -> None:
    """Print the top-k results: rank, score, image id, path and caption. A query the store already holds (a caption
    of the dataset, a file with the bytes of one of its images) is read from its cached features: no encoder loads.
    On the CPU a text query runs the run's ONNX text tower and heads (exported into the store by the first search,
    which loads torch once; later searches import neither torch nor transformers)."""
    from stratalign.cli.common import err_console, plain_columns, store_url
    from stratalign.cli.model_opts import open_model
    from stratalign.errors import StratalignError
    from stratalign.store.feature_store import FeatureStore
    from stratalign.use.cached import CachedFeatures
    from stratalign.use.fast import QueryModel
    from stratalign.use.search import search

    if (query is None or not query.strip()) and image is None:
        raise StratalignError("empty query: give a text, or --image PATH")
    if query is not None and image is not None:
        raise StratalignError("give a text query or --image, not both")
    if not 1 <= k <= 1000:
        raise StratalignError(f"-k must be between 1 and 1000, got {k}")
    if device in ("auto", "cpu"):  # one query: the CPU's ONNX path answers sooner than loading CUDA would
        fs = FeatureStore.open(store_url(store), "a")
        m = QueryModel.from_run(fs, run, device="cpu", progress=lambda line: err_console.print(line, highlight=False))
    else:
        m, fs = open_model(run, None, store, device, mode="a")
    by = "image" if image is not None else "text"
    hits = search(fs, m, dataset, [image if image is not None else query], k, by=by, split=split,
                  cached=CachedFeatures(fs, m, dataset))[0]
    media = None
    rows = []
    for i, h in enumerate(hits):
        if h.path is None:  # the row's path is outside the dataset's image roots: say which, as extract does
            from stratalign.store.containment import DatasetMedia

            media = media or DatasetMedia.of(fs.dataset(dataset))
            media.path(h.image_row)
        rows.append([str(i + 1), f"{h.score:.4f}", h.image_id, h.path, h.caption])
    console.out(plain_columns(["rank", "score", "image", "path", "caption"], rows), highlight=False)
