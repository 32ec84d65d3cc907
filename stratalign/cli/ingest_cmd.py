"""`stratalign ingest`: read a pair dataset and keep its tables in the store."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, store_url
from stratalign.errors import StratalignError
from stratalign.stages.sources import SOURCES, ingest_source
from stratalign.store.features import FeatureStore


def ingest(
    source: str = typer.Argument(..., help=f"One of: {', '.join(SOURCES)}."),
    name: Optional[str] = typer.Option(None, help="Dataset name in the store (default: the source kind)."),
    captions: Optional[str] = typer.Option(None, help="coco: the captions_*.json file."),
    split_file: Optional[str] = typer.Option(None, help="karpathy: dataset_coco.json / dataset_flickr30k.json."),
    images: Optional[str] = typer.Option(None, help="coco/karpathy: image folder; table: image root."),
    table: Optional[str] = typer.Option(None, help="table: a .csv, .tsv, .parquet or .jsonl file."),
    image_col: str = typer.Option("image", help="table: column holding image paths."),
    caption_col: str = typer.Option("caption", help="table: column holding captions."),
    label_col: Optional[str] = typer.Option(None, help="table: optional label column."),
    id_col: Optional[str] = typer.Option(None, help="table: optional image id column."),
    split_col: Optional[str] = typer.Option(None, help="table: optional split column (train/val/test)."),
    seed: int = typer.Option(0, help="Seed of the train/val/test split when the source has none."),
    limit: Optional[int] = typer.Option(None, help="Keep only the first N images (quick looks)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Ingest the rest and record what was skipped."),
    replace: bool = typer.Option(False, "--replace", help="Replace a dataset of the same name."),
    store: Optional[str] = StoreOption,
) -> None:
    """Ingest a pair dataset (COCO, Karpathy split, a table, or the embedded twemoji)."""
    args: dict = {}
    if source == "coco":
        if not captions or not images:
            raise StratalignError("coco needs --captions captions_*.json and --images FOLDER")
        args = {"captions_json": captions, "image_dir": images}
    elif source == "karpathy":
        if not split_file or not images:
            raise StratalignError("karpathy needs --split-file dataset_*.json and --images FOLDER")
        args = {"split_json": split_file, "image_dir": images}
    elif source == "table":
        if not table:
            raise StratalignError("table needs --table FILE (.csv/.tsv/.parquet/.jsonl)")
        args = {"table": table, "image_col": image_col, "caption_col": caption_col, "label_col": label_col,
                "id_col": id_col, "split_col": split_col, "image_root": images}
    ds = ingest_source(source, name, seed=seed, skip_bad=skip_bad, limit=limit, **args)
    fs = FeatureStore.open(store_url(store), "a", create=True)
    written = fs.save_dataset(ds, replace=replace)
    for item in ds.meta.get("skipped", [])[:10]:
        console.print(f"[yellow]skipped[/yellow] {item['kind']} {item['id']}: {item['reason']}")
    summary = ", ".join(f"{k}={v}" for k, v in ds.summary().items())
    console.print(f"{'ingested' if written else 'already ingested (identical)'}: {summary}")
