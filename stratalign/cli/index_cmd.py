"""`stratalign index`: a FAISS index of a dataset's images in a run's space, kept in the store."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption


def index_cmd(
    run: str = typer.Option(..., "--run", help="Run id (or a unique prefix)."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset to index."),
    split: Optional[str] = typer.Option(None, "--split", help="Index one split only (train | val | test)."),
    captions: bool = typer.Option(False, "--captions", help="Index the captions (for image -> text search)."),
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Build (or find) the index that `stratalign search` uses; an existing one is reused."""
    from stratalign.cli.model_opts import open_model
    from stratalign.use.search import dataset_index

    m, fs = open_model(run, None, store, device, mode="a")
    idx = dataset_index(fs, m, dataset, "text" if captions else "image", split)
    console.print(f"{'reused' if idx.reused else 'built'} index {idx.key}: {len(idx.rows)} {idx.modality} vectors "
                  f"({idx.source})", highlight=False)
