"""Options shared by the commands that use a trained model (embed, classify, search, index, export, serve).

Light at import: the model and the store are imported inside `open_model`."""

from __future__ import annotations

from typing import Any, Optional

import typer

RunOption = typer.Option(None, "--run", help="Run id (or a unique prefix; see `stratalign runs ls`).")
ModelOption = typer.Option(None, "--model", help="Folder written by `stratalign export` (no store needed).")
DeviceOption = typer.Option("auto", "--device", help="auto (cuda when present) | cpu | cuda[:i].")


def open_model(run: Optional[str], model: Optional[str], store: Optional[str], device: str = "auto",
               mode: str = "r") -> tuple[Any, Any]:
    """(AlignedModel, FeatureStore or None) from --run (in the store) or --model (an exported folder)."""
    from stratalign.errors import StratalignError
    from stratalign.use.model import AlignedModel

    if (run is None) == (model is None):
        raise StratalignError("give exactly one of --run R (a run in the store) or --model DIR (an exported model)")
    if model is not None:
        return AlignedModel.load(model, device=device), None
    from stratalign.cli.common import store_url
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), mode)
    return AlignedModel.from_run(fs, run, device=device), fs
