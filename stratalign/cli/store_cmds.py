"""`stratalign store ls | verify | rm` and `stratalign datasets`."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url
from stratalign.errors import StratalignError
from stratalign.stores.feature_store import FeatureStore

store_app = typer.Typer(help="Inspect, verify and clean the feature store.", no_args_is_help=True)


@store_app.command("ls")
def store_ls(store: Optional[str] = StoreOption) -> None:
    """List feature entries: dataset, encoder, pooling, layers, dim, rows, complete shards, bytes."""
    fs = FeatureStore.open(store_url(store), "r")
    for name in fs.datasets():
        console.print("dataset " + ", ".join(f"{k}={v}" for k, v in fs.dataset(name).summary().items()))
    table = fs.entry_table()
    if table.height == 0:
        console.print(f"no feature entries in {fs.url}")
    else:
        print_table(table, title=f"feature entries in {fs.url}")


@store_app.command("verify")
def store_verify(store: Optional[str] = StoreOption) -> None:
    """Re-read every chunk; report corrupt or incomplete shards (non-zero exit if any)."""
    fs = FeatureStore.open(store_url(store), "r")
    problems = 0
    for entry in fs.entries():
        report = entry.verify()
        for shard, layer, why in report["corrupt"]:
            console.print(f"[red]corrupt[/red] {entry.key} shard {shard} layer {layer}: {why}")
        if report["incomplete"]:
            console.print(f"[yellow]incomplete[/yellow] {entry.key}: shards {report['incomplete']}")
        problems += len(report["corrupt"]) + len(report["incomplete"])
        if not report["corrupt"] and not report["incomplete"]:
            console.print(f"[green]ok[/green] {entry.key} ({entry.spec.n_shards} shards)")
    if problems:
        raise StratalignError(f"store {fs.url} has {problems} corrupt or incomplete shard(s); see above")


@store_app.command("rm")
def store_rm(
    keys: list[str] = typer.Argument(None, help="Entry keys to remove (see `store ls`)."),
    dataset: Optional[str] = typer.Option(None, help="Remove a dataset's tables (its features stay)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    store: Optional[str] = StoreOption,
) -> None:
    """Remove feature entries or a dataset."""
    fs = FeatureStore.open(store_url(store), "a")
    targets = list(keys or [])
    if not targets and not dataset:
        raise StratalignError("name entry keys or --dataset to remove")
    for key in targets:
        fs.entry(key)  # validates the key and that it exists
    if not yes and not typer.confirm(f"remove {len(targets)} entr(y/ies){' and dataset ' + dataset if dataset else ''}?"):
        raise typer.Exit(1)
    for key in targets:
        fs.remove_entry(key)
        console.print(f"removed {key}")
    if dataset:
        fs.dataset(dataset)
        fs.remove_dataset(dataset)
        console.print(f"removed dataset {dataset}")
