"""`stratalign export`: a run as a self-contained model folder (model.json + heads.safetensors + README.md)."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console


def export_cmd(
    run: str = typer.Option(..., "--run", help="Run id (or a unique prefix; see `stratalign runs ls`)."),
    out: str = typer.Option(..., "--out", help="Folder to write (created; files in it are replaced)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Export a run as a folder usable without the store (model.json + heads.safetensors + README.md card).

    model.json holds the encoder specs and weights hashes, layers, pooling, preprocessing, zero-shot classes and
    templates, the run's config and metrics. Load it with `AlignedModel.from_pretrained(DIR)` or `--model DIR`."""
    from stratalign.cli.common import store_url
    from stratalign.store.exports import write_export
    from stratalign.store.feature_store import FeatureStore
    from stratalign.use.card import model_card_markdown, run_card

    card, heads = run_card(FeatureStore.open(store_url(store), "r"), run)
    path = write_export(out, card, heads, readme=model_card_markdown(card))
    v, t = card["towers"]["image"], card["towers"]["text"]
    console.print(f"exported run {card['run_id']} to {path}: {v['encoder']} layer {v['layer']} ({v['pooling']}), "
                  f"{t['encoder']} layer {t['layer']} ({t['pooling']})", highlight=False)
