"""`stratalign runs ls`: the finished runs in the store."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url

runs_app = typer.Typer(help="Trained runs in the store.", no_args_is_help=True)

# what the table shows, in this order, where the registry has the column
RUN_COLUMNS = ("run", "dataset", "objective", "head", "layer_rule", "vision_layer", "text_layer", "n_pairs", "seed",
               "best_step", "lambda_at_best", "i2t_R@1", "t2i_R@1", "zs_top1")


@runs_app.command("ls")
def runs_ls(store: Optional[str] = StoreOption) -> None:
    """Table of finished runs with their headline metrics."""
    from stratalign.store.features import FeatureStore
    from stratalign.store.runs import RunRegistry

    fs = FeatureStore.open(store_url(store), "r")
    table = RunRegistry(fs).table()
    if table.height == 0:
        console.print(f"no runs in {fs.url}")
        return
    print_table(table.select([c for c in RUN_COLUMNS if c in table.columns]), title=f"runs in {fs.url}")
