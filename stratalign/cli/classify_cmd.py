"""`stratalign classify`: zero-shot labels of image files among class names."""

from __future__ import annotations

from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption, ModelOption, RunOption


def classify_cmd(
    images: List[str] = typer.Argument(..., help="Image files."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names (default: the "
                                          "run's dataset's labels)."),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} (repeat; "
                                                 "default: the run's dataset's templates)."),
    run: Optional[str] = RunOption,
    model: Optional[str] = ModelOption,
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Print each image's predicted class and its cosine score."""
    from stratalign.cli.common import plain_columns
    from stratalign.cli.model_opts import open_model

    m, _ = open_model(run, model, store, device)
    names = [c.strip() for c in classes.split(",")] if classes is not None else None
    res = m.classify(images, names, template or None)
    rows = [[path, label, f"{res.scores[i, res.indices[i]]:.4f}"] for i, (path, label) in enumerate(zip(images, res.labels))]
    console.out(plain_columns(["image", "class", "score"], rows), highlight=False)
