"""`stratalign runs ls | show | rm`: the trained runs in the store."""

from __future__ import annotations

import json
from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url

runs_app = typer.Typer(help="Trained runs in the store.", no_args_is_help=True)


# `runs ls` without --wide: the columns that tell runs apart and how they did. The head, subset size and seed are
# not repeated beside the id, which spells them (<objective>-<head>-[<layers>-]n<pairs>-s<seed>-<hash>, both id forms)
NARROW = ("run", "dataset", "vision", "text", "layers", "objective", "overrides", "selection", "i2t_R@1", "t2i_R@1",
          "zs_top1")


@runs_app.command("ls")
def runs_ls(
    dataset: Optional[str] = typer.Option(None, help="Only runs on this dataset."),
    objective: Optional[str] = typer.Option(None, help="Only runs of this objective."),
    wide: bool = typer.Option(False, "--wide", help="Every column (best step, seconds) and no column folded into "
                                                     "the title."),
    store: Optional[str] = StoreOption,
) -> None:
    """Table of finished runs: layers, objective, settings set beyond the preset, selection score, test metrics
    (--wide: also best step and seconds). A dataset or encoder shared by every run is named once, in the title."""
    from stratalign.stages.runs.listing import runs_table
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "r")
    table = runs_table(fs, dataset, objective)
    if table.height == 0:
        console.print(f"no runs in {fs.url}" + (" matching the filters" if dataset or objective else ""))
        return
    title = f"runs in {fs.url}"
    if not wide:
        shared = [c for c in ("dataset", "vision", "text") if c in table.columns and table[c].n_unique() == 1]
        if shared:
            title += " (" + ", ".join(f"{c} {table[c][0]}" for c in shared) + ")"
        table = table.select([c for c in NARROW if c in table.columns and c not in shared])
    print_table(table, title=title, no_wrap=("run",))


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="A run id or a unique prefix of one."),
              as_json: bool = typer.Option(False, "--json", help="The whole resolved config, metrics and files as JSON."),
              store: Optional[str] = StoreOption) -> None:
    """One run: what it trained on, how its checkpoint was chosen, its test metrics and files (--json: everything)."""
    from stratalign.stages.runs.listing import show_lines, show_run
    from stratalign.store.feature_store import FeatureStore

    shown = show_run(FeatureStore.open(store_url(store), "r"), run)
    if as_json:
        doc = {"run": shown["run"], "config": shown["config"], "overrides": shown["overrides"],
               "metrics": shown["metrics"], "files": {name: size for name, size in shown["files"]}}
        console.out(json.dumps(doc, indent=1, sort_keys=True), highlight=False)
        return
    for line in show_lines(shown):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


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
