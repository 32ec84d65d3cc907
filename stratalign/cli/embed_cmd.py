"""`stratalign embed`: images and texts (or a whole dataset) to embeddings: .npy + Parquet metadata."""

from __future__ import annotations

from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption, ModelOption, RunOption


def embed_cmd(
    out: str = typer.Option(..., "--out", help="Folder to write (img_emb/, text_emb/, metadata/); a path ending "
                            "in .parquet writes one file (kind, item, embedding)."),
    images: Optional[List[str]] = typer.Option(None, "--images", help="Image files, folders, globs ('shots/**/*.jpg') "
                                               "or list files (.txt, one path a line); repeat the option."),
    texts: Optional[List[str]] = typer.Option(None, "--texts", help="Texts (repeat the option)."),
    text_file: Optional[List[str]] = typer.Option(None, "--text-file", help="A file of texts, one a line."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Embed every image and caption of a dataset "
                                          "(from the store's cached features when it holds them)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A progress bar on a terminal."),
    run: Optional[str] = RunOption,
    model: Optional[str] = ModelOption,
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Embed images and texts in a model's space (unit vectors). With --run, items the store already holds (a
    dataset's captions, files with the bytes of its images) are read from its cached features; an encoder runs,
    up to its chosen layer, only for the rest."""
    from tqdm import tqdm

    from stratalign.cli.model_opts import open_model
    from stratalign.errors import StratalignError
    from stratalign.use.cached import CachedFeatures
    from stratalign.use.embed import embed_dataset, embed_items, expand_images, expand_texts, write_parts

    image_items = expand_images(images or [])
    text_items = expand_texts(texts or [], text_file or [])
    if not (image_items or text_items or dataset):
        raise StratalignError("nothing to embed: give --images, --texts, --text-file or --dataset")
    m, fs = open_model(run, model, store, device)
    if dataset and fs is None:
        raise StratalignError("--dataset reads the store: use --run R (not --model)")
    cached = CachedFeatures(fs, m, m.card["dataset"]) if fs is not None and m.card.get("dataset") in fs.datasets() \
        else None
    total = len(image_items) + len(text_items) + (fs.dataset(dataset).images.height + fs.dataset(dataset).n_captions
                                                  if dataset else 0)
    with tqdm(total=total, unit="item", desc="embedding", disable=None if progress else True) as bar:
        parts = embed_dataset(fs, m, dataset, bar.update) if dataset else []
        for modality, items in (("image", image_items), ("text", text_items)):
            if items:
                parts.append(embed_items(m, items, modality, cached, bar.update))
    if dataset and (image_items or text_items):  # one file per modality: a dataset's rows, then the items
        import numpy as np

        from stratalign.use.embed import Part

        merged = []
        for modality in ("image", "text"):
            ps = [p for p in parts if p.modality == modality]
            if ps:
                merged.append(Part(modality, sum((p.items for p in ps), []), np.concatenate([p.z for p in ps]),
                                   sum((p.rows for p in ps), []), sum((p.from_store for p in ps), [])))
        parts = merged
    files = write_parts(out, parts)
    stored = sum(sum(p.from_store) for p in parts)
    n = sum(len(p.items) for p in parts)
    console.print(f"wrote {n} embeddings of dim {parts[0].z.shape[1]} ({stored} from the store's cached features) to "
                  f"{out} (run {m.run_id}): {', '.join(files)}", highlight=False)
