"""`stratalign store ls | verify | rm` and `stratalign datasets`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from stratalign.cli.common import StoreOption, console, print_table, store_url
from stratalign.errors import StratalignError
from stratalign.store.features import FeatureStore

store_app = typer.Typer(help="Inspect, verify and clean the feature store.", no_args_is_help=True)


@store_app.command("ls")
def store_ls(store: Optional[str] = StoreOption) -> None:
    """List datasets and feature entries (dataset, encoder, pooling, layers, dim, rows, shards, bytes, status)."""
    fs = FeatureStore.open(store_url(store), "r")
    for name in fs.dataset_folders():
        try:
            console.print("dataset " + ", ".join(f"{k}={v}" for k, v in fs.dataset(name).summary().items()))
        except StratalignError as exc:
            console.print(f"dataset {name}: [red]broken[/red] ({escape(str(exc))})", soft_wrap=True)
    table = fs.entry_table()
    if table.height == 0:
        console.print(f"no feature entries in {fs.url}")
    else:
        print_table(table, title=f"feature entries in {fs.url}")


def _verify_datasets(fs: FeatureStore) -> int:
    """Load every dataset folder (tables, sizes, metadata); print each result; return the number broken."""
    problems = 0
    for name in fs.dataset_folders():
        try:
            ds = fs.dataset(name)
        except StratalignError as exc:
            console.print(f"[red]broken dataset[/red] {name}: {escape(str(exc))}", soft_wrap=True)
            problems += 1
            continue
        console.print(f"[green]ok[/green] dataset {name} ({ds.images.height} images, {ds.captions.height} captions)")
    return problems


def _verify_entries(fs: FeatureStore) -> int:
    """Re-read every chunk of every entry folder; print each result; return the number of problems."""
    problems = 0
    if fs.loc.exists("features", "zarr.json"):
        try:
            fs.loc.read_json("features", "zarr.json")
        except StratalignError as exc:
            console.print(f"[red]broken[/red] features group: {escape(str(exc))}", soft_wrap=True)
            problems += 1
    for key, entry, why in fs.scan_entries():
        report = None
        if entry is not None:
            try:
                report = entry.verify()
            except StratalignError as exc:  # e.g. a corrupt shard marker
                why = str(exc)
        if entry is None or report is None:
            console.print(f"[red]broken[/red] {key}: {escape(str(why))}", soft_wrap=True)
            problems += 1
            continue
        for shard, layer, what in report["corrupt"]:
            console.print(f"[red]corrupt[/red] {entry.key} shard {shard} layer {layer}: {escape(what)}",
                          soft_wrap=True)
        if report["incomplete"]:
            console.print(f"[yellow]incomplete[/yellow] {entry.key}: shards {report['incomplete']}")
        problems += len(report["corrupt"]) + len(report["incomplete"])
        if not report["corrupt"] and not report["incomplete"]:
            console.print(f"[green]ok[/green] {entry.key} ({entry.spec.n_shards} shards)")
    return problems


@store_app.command("verify")
def store_verify(store: Optional[str] = StoreOption) -> None:
    """Load every dataset and re-read every entry's chunks; report broken datasets or entries and corrupt or
    incomplete shards (non-zero exit if any)."""
    fs = FeatureStore.open(store_url(store), "r")
    problems = _verify_datasets(fs) + _verify_entries(fs)
    if problems:
        raise StratalignError(f"store {fs.url} has {problems} problem(s) (broken datasets or entries, corrupt or "
                              "incomplete shards); see above")


@store_app.command("rm")
def store_rm(
    keys: list[str] = typer.Argument(None, help="Entry keys to remove (see `store ls`; broken entries too)."),
    dataset: Optional[str] = typer.Option(None, help="Remove a dataset's tables (its features stay)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    store: Optional[str] = StoreOption,
) -> None:
    """Remove feature entries or a dataset (readable or broken)."""
    fs = FeatureStore.open(store_url(store), "a")
    targets = list(keys or [])
    if not targets and not dataset:
        raise StratalignError("name entry keys or --dataset to remove")
    for key in targets:
        fs.entry_folder(key)  # validates the key (no path escapes) and that its folder exists
    if dataset:
        fs.dataset_folder(dataset)
    if not yes and not typer.confirm(f"remove {len(targets)} entr(y/ies){' and dataset ' + dataset if dataset else ''}?"):
        raise typer.Exit(1)
    for key in targets:
        fs.remove_entry(key)
        console.print(f"removed {key}")
    if dataset:
        fs.remove_dataset(dataset)
        console.print(f"removed dataset {dataset}")
