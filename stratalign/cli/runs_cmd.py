"""`stratalign runs ls | show | rm`: the trained runs in the store."""

from __future__ import annotations

import json
from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url

runs_app = typer.Typer(help="Trained runs in the store.", no_args_is_help=True)


@runs_app.command("ls")
def runs_ls(
    dataset: Optional[str] = typer.Option(None, help="Only runs on this dataset."),
    objective: Optional[str] = typer.Option(None, help="Only runs of this objective."),
    store: Optional[str] = StoreOption,
) -> None:
    """Table of finished runs: encoders, layers, objective, settings overridden, selection score, metrics, seconds."""
    from stratalign.stages.runs.listing import runs_table
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "r")
    table = runs_table(fs, dataset, objective)
    if table.height == 0:
        console.print(f"no runs in {fs.url}" + (" matching the filters" if dataset or objective else ""))
        return
    print_table(table, title=f"runs in {fs.url}")


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="A run id or a unique prefix of one."),
              store: Optional[str] = StoreOption) -> None:
    """One run's resolved config, metrics and files."""
    from stratalign.stages.runs.listing import show_run
    from stratalign.store.feature_store import FeatureStore

    shown = show_run(FeatureStore.open(store_url(store), "r"), run)
    console.print(f"run {shown['run']}", highlight=False)
    console.out(json.dumps({"config": shown["config"], "overrides": shown["overrides"], "metrics": shown["metrics"]},
                           indent=1, sort_keys=True), highlight=False)
    for name, size in shown["files"]:
        console.print(f"  {name}  {size:,} bytes", highlight=False)


@runs_app.command("rm")
def runs_rm(runs: list[str] = typer.Argument(..., help="Run ids (or unique prefixes) to remove."),
            yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
            store: Optional[str] = StoreOption) -> None:
    """Remove runs (weights, metrics, eval files, per-query results)."""
    from stratalign.stages.runs.listing import remove_run
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    fs = FeatureStore.open(store_url(store), "a")
    ids = [RunRegistry(fs).resolve(r) for r in runs]
    if not yes and not typer.confirm(f"remove {len(ids)} run(s): {', '.join(ids)}?"):
        raise typer.Exit(1)
    for rid in ids:
        remove_run(fs, rid)
        console.print(f"removed run {rid}", highlight=False)
