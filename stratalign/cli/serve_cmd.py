"""`stratalign serve`: a local web page to search a dataset with one or more runs side by side."""

from __future__ import annotations

from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console
from stratalign.cli.model_opts import DeviceOption


def serve_cmd(
    run: List[str] = typer.Option(..., "--run", help="Run id or prefix; repeat to compare runs side by side."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset whose images are searched."),
    split: Optional[str] = typer.Option(None, "--split", help="Search one split only (train | val | test)."),
    k: int = typer.Option(8, "-k", help="Results per run."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Start the search page (needs the `serve` extra: pip install 'stratalign[serve]')."""
    from stratalign.cli.common import store_url
    from stratalign.errors import StratalignError
    from stratalign.store.feature_store import FeatureStore
    from stratalign.use.model import AlignedModel

    try:
        import uvicorn

        from stratalign.use.serve_app import create_app
    except ImportError:
        raise StratalignError("serve needs fastapi and uvicorn: pip install 'stratalign[serve]'") from None
    fs = FeatureStore.open(store_url(store), "a")
    models = [AlignedModel.from_run(fs, r, device=device) for r in run]
    app = create_app(fs, models, dataset, k, split)
    console.print(f"serving {dataset} with {', '.join(m.run_id for m in models)} on http://{host}:{port}/",
                  highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")
