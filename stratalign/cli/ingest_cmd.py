"""`stratalign ingest coco | karpathy | table | twemoji | webdataset | hf`: read a pair dataset and keep its tables in the store.

One sub-command per source, each with only its own options; the options every source shares are declared once
below.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape

from stratalign.cli.common import StoreOption, console, store_url
from stratalign.errors import StratalignError

ingest_app = typer.Typer(help="Ingest a pair dataset (COCO, Karpathy split, a table, webdataset tars, a Hugging Face "
                         "dataset, or the embedded twemoji).",
                         no_args_is_help=True)

NameOption = typer.Option(None, help="Dataset name in the store (default: the source kind).")
SeedOption = typer.Option(0, help="Seed of the train/val/test split when the source has none.")
LimitOption = typer.Option(None, help="Keep only the first N images (quick looks).")
SkipBadOption = typer.Option(False, "--skip-bad", help="Ingest the rest and record what was skipped.")
ReplaceOption = typer.Option(False, "--replace", help="Replace a dataset of the same name.")
TemplateOption = typer.Option(None, "--template", help="A zero-shot template with one '{}' for the class name "
                              "(repeat for several; default 'a photo of a {}.', twemoji 'an emoji of {}.').")
TemplatesFileOption = typer.Option(None, help="A file of zero-shot templates: one per line, or JSON (a list, or "
                                   "{\"templates\": [...], \"class_names\": {label: name}}).")


def _ingest(source: str, name: Optional[str], seed: int, limit: Optional[int], skip_bad: bool, replace: bool,
            store: Optional[str], templates: Optional[list[str]], templates_file: Optional[str], **args: Any) -> None:
    """Read and validate the source, save it (unless the identical dataset is there), print what happened."""
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.store.datasets import no_train_fix
    from stratalign.store.feature_store import FeatureStore

    ds = ingest_source(source, name, seed=seed, skip_bad=skip_bad, limit=limit, templates=templates or None,
                       templates_file=templates_file, **args)
    fs = FeatureStore.open(store_url(store), "a", create=True)
    written = fs.save_dataset(ds, replace=replace)
    for reason, what in ((ds.meta.get("source") or {}).get("left_out") or {}).items():
        console.print(f"[yellow]left out[/yellow] {what['count']} tar member(s): {escape(reason)} "
                      f"(e.g. {escape(', '.join(what['examples']))})", soft_wrap=True)
    for item in ds.meta.get("skipped", [])[:10]:
        console.print(f"[yellow]skipped[/yellow] {item['kind']} {item['id']}: {item['reason']}")
    summary = ", ".join(f"{k}={v}" for k, v in ds.summary().items())
    console.print(f"{'ingested' if written else 'already ingested (identical)'}: {summary}")
    if ds.class_names:
        console.print(f"zero-shot prompts: {len(ds.class_names)} classes x {len(ds.templates)} template(s) "
                      f"({'; '.join(ds.templates[:3])}{' ...' if len(ds.templates) > 3 else ''})", highlight=False)
    elif templates or templates_file:
        console.print(f"note: dataset {ds.name!r} has no labels, so its templates are kept but unused "
                      "(zero-shot classification needs a label column)")
    identical = ds.meta.get("identical_images")
    if identical:
        console.print(f"grouped {identical['images']} byte-identical images ({identical['sets']} sets of one "
                      "content hash): each set is kept in one split")
        if identical["across_given_splits"]:
            console.print(f"[yellow]warning[/yellow]: the source's split puts {identical['across_given_splits']} "
                          "of these sets in several splits (kept as given): an evaluation there scores images "
                          "the heads trained on; fix the split column, or ingest without it to draw one")
    counts = ds.split_counts()
    if not counts.get("train"):
        console.print(f"[yellow]warning[/yellow]: dataset {ds.name!r} has no train split; "
                      f"`layers` and `train` will refuse it: {no_train_fix(ds.name)}")
    elif not counts.get("val"):
        console.print(f"note: dataset {ds.name!r} has no val split; sweeps and `train --tune` will choose each "
                      "cell's step and knobs by k-fold cross-validation over its training pairs (5 folds), and a "
                      "lone run carves 10 % of the train split's images (--validation picks)")


@ingest_app.command("coco")
def ingest_coco(
    captions: Optional[str] = typer.Option(None, help="The captions_*.json file (required)."),
    images: Optional[str] = typer.Option(None, help="Image folder (required)."),
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """COCO captions: a captions_*.json file and its image folder."""
    if not captions or not images:
        raise StratalignError("coco needs --captions captions_*.json and --images FOLDER")
    _ingest("coco", name, seed, limit, skip_bad, replace, store, template, templates_file, captions_json=captions,
            image_dir=images, progress=True)


@ingest_app.command("karpathy")
def ingest_karpathy(
    split_file: Optional[str] = typer.Option(None, help="dataset_coco.json / dataset_flickr30k.json (required)."),
    images: Optional[str] = typer.Option(None, help="Image folder (required)."),
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """A Karpathy split file (COCO, Flickr30k) and its image folder; the split file's train/val/test is kept."""
    if not split_file or not images:
        raise StratalignError("karpathy needs --split-file dataset_*.json and --images FOLDER")
    _ingest("karpathy", name, seed, limit, skip_bad, replace, store, template, templates_file, split_json=split_file,
            image_dir=images)


@ingest_app.command("table")
def ingest_table(
    table: Optional[str] = typer.Option(None, help="A .csv, .tsv, .parquet or .jsonl file (required)."),
    images: Optional[str] = typer.Option(None, help="Image root the paths are relative to (default: the table's folder)."),
    image_col: str = typer.Option("image", help="Column holding image paths."),
    caption_col: str = typer.Option("caption", help="Column holding captions."),
    label_col: Optional[str] = typer.Option(None, help="Optional label column."),
    id_col: Optional[str] = typer.Option(None, help="Optional image id column."),
    split_col: Optional[str] = typer.Option(None, help="Optional split column (train/val/test); without it a "
                                            "70/10/20 split is drawn by --seed."),
    group_col: Optional[str] = typer.Option(None, help="Optional group column: images of one group (one patient, "
                                            "the variants of one item) always land in one split."),
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """A table with one row per (image path, caption); rows sharing an image are grouped."""
    if not table:
        raise StratalignError("table needs --table FILE (.csv/.tsv/.parquet/.jsonl)")
    _ingest("table", name, seed, limit, skip_bad, replace, store, template, templates_file, table=table,
            image_col=image_col, caption_col=caption_col, label_col=label_col, id_col=id_col, split_col=split_col,
            group_col=group_col, image_root=images)


@ingest_app.command("twemoji")
def ingest_twemoji(
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """The embedded Twemoji set (caption = Unicode name, label = category); needs the 'embedded' extra."""
    _ingest("twemoji", name, seed, limit, skip_bad, replace, store, template, templates_file)


@ingest_app.command("webdataset")
def ingest_webdataset(
    shards: list[str] = typer.Argument(..., help="Tar shards: paths or fsspec URLs, a brace range "
                                       "(shards-{00000..00099}.tar) or a glob."),
    caption_ext: str = typer.Option("txt", help="Extension of the caption member (`.json`'s caption field "
                                    "is used when it is absent)."),
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """webdataset tar shards as img2dataset writes them: <key>.jpg/.png + <key>.txt (+ <key>.json)."""
    _ingest("webdataset", name, seed, limit, skip_bad, replace, store, template, templates_file, shards=list(shards),
            caption_ext=caption_ext, progress=True)


@ingest_app.command("hf")
def ingest_hf(
    path: str = typer.Argument(..., help="A local Hugging Face dataset (save_to_disk folder), or Arrow / Parquet "
                               "files or a folder of them."),
    image_col: str = typer.Option("image", help="Column holding the images (an Image feature or paths)."),
    text_col: str = typer.Option("text", help="Column holding the caption (or a list of captions)."),
    image_dir: Optional[str] = typer.Option(None, help="Where embedded image bytes are written "
                                            "(default: <path>-images)."),
    name: Optional[str] = NameOption,
    seed: int = SeedOption,
    limit: Optional[int] = LimitOption,
    skip_bad: bool = SkipBadOption,
    replace: bool = ReplaceOption,
    template: Optional[list[str]] = TemplateOption,
    templates_file: Optional[str] = TemplatesFileOption,
    store: Optional[str] = StoreOption,
) -> None:
    """A local Hugging Face dataset with an image and a text column; its split names are kept."""
    _ingest("hf", name, seed, limit, skip_bad, replace, store, template, templates_file, path=path,
            image_col=image_col, text_col=text_col, image_dir=image_dir, progress=True)
