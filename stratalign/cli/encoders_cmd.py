"""`stratalign encoders`: the encoders known offline."""

from __future__ import annotations

from stratalign.cli.common import print_table


def encoders_cmd() -> None:
    """List the known encoders with their modality, layers and dim."""
    import polars as pl

    from stratalign.encoders import known_encoders

    rows = [{"name": e.name, "modality": e.modality, "layers": e.n_layers, "dim": str(e.dim),
             "description": e.description} for e in known_encoders()]
    print_table(pl.DataFrame(rows), title="known encoders (also: hf:<id or dir>, open_clip:<arch>[:<file>], timm:<name>)")
