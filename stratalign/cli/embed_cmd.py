"""`stratalign embed`: images and texts (or a whole dataset) to a parquet file of embeddings."""

from __future__ import annotations

from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption, ModelOption, RunOption


def embed_cmd(
    out: str = typer.Option(..., "--out", help="Parquet file to write: kind, item, embedding."),
    images: Optional[List[str]] = typer.Option(None, "--images", help="Image files (repeat the option)."),
    texts: Optional[List[str]] = typer.Option(None, "--texts", help="Texts (repeat the option)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Embed every image and caption of a dataset."),
    run: Optional[str] = RunOption,
    model: Optional[str] = ModelOption,
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Embed images and texts in a model's space (unit vectors): each encoder runs only up to its chosen layer."""
    import polars as pl

    from stratalign.cli.model_opts import open_model
    from stratalign.errors import StratalignError

    if not (images or texts or dataset):
        raise StratalignError("nothing to embed: give --images, --texts or --dataset")
    m, fs = open_model(run, model, store, device)
    parts = []
    if dataset:
        if fs is None:
            raise StratalignError("--dataset reads the store: use --run R (not --model)")
        ds = fs.dataset(dataset)
        images = list(images or []) + ds.images["path"].to_list()
        texts = list(texts or []) + ds.captions["text"].to_list()
    if images:
        parts.append(("image", list(images), m.encode_image(list(images))))
    if texts:
        parts.append(("text", list(texts), m.encode_text(list(texts))))
    frame = pl.concat([pl.DataFrame({"kind": [k] * len(items), "item": items, "embedding": z.tolist()},
                                    schema={"kind": pl.Utf8, "item": pl.Utf8, "embedding": pl.List(pl.Float32)})
                       for k, items, z in parts])
    frame.write_parquet(out)
    console.print(f"wrote {frame.height} embeddings of dim {parts[0][2].shape[1]} to {out} (run {m.run_id})",
                  highlight=False)
