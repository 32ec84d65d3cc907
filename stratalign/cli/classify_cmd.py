"""`stratalign classify`: zero-shot top-k classes of images, with probabilities."""

from __future__ import annotations

from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption, ModelOption, RunOption


def classify_cmd(
    images: List[str] = typer.Argument(..., help="Image files, folders, globs or list files (.txt)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names (default: the "
                                          "run's dataset's labels)."),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} (repeat; "
                                                 "default: the run's dataset's templates)."),
    k: int = typer.Option(1, "-k", help="Classes shown per image, most likely first."),
    run: Optional[str] = RunOption,
    model: Optional[str] = ModelOption,
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Print each image's top-k classes with their probability (softmax of the cosines at the run's training
    temperature) and cosine score. With --run, images and class prompts the store holds come from its cache."""
    from stratalign.cli.common import plain_columns
    from stratalign.cli.model_opts import open_model
    from stratalign.errors import StratalignError
    from stratalign.use.cached import CachedFeatures, cached_class_embeddings
    from stratalign.use.embed import expand_images
    from stratalign.use.model import classify_embeddings

    if k < 1:
        raise StratalignError(f"-k must be at least 1, got {k}")
    files = expand_images(images)
    m, fs = open_model(run, model, store, device)
    names = [c.strip() for c in classes.split(",")] if classes is not None else None
    if fs is not None:
        classes_, emb = cached_class_embeddings(fs, m, names, template or None)
        ds = m.card.get("dataset")
        x = CachedFeatures(fs, m, ds).features(files, "image") if ds in fs.datasets() else m.features(files, "image")
        res = classify_embeddings(m.encode_features(x, "image"), classes_, emb, m.temperature)
    else:
        res = m.classify(files, names, template or None)
    rows = [[path, str(r + 1), label, f"{p:.4f}", f"{s:.4f}"]
            for path, top in zip(files, res.top(min(k, len(res.classes)))) for r, (label, p, s) in enumerate(top)]
    console.out(plain_columns(["image", "rank", "class", "probability", "score"], rows), highlight=False)
