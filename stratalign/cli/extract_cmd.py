"""`stratalign extract`: run encoders over a dataset and write every layer's pooled features to the store."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url

# = stratalign.store.feature_store.DEFAULT_SHARD_ROWS, spelt out so that `--help` does not import the store (zarr);
# tests/cli/test_main.py checks that the two agree
DEFAULT_SHARD_ROWS = 1024


def extract_cmd(
    dataset: str = typer.Option(..., help="Dataset name in the store (see `stratalign ingest`)."),
    encoder: list[str] = typer.Option(..., "--encoder", "-e", help="Encoder spec; repeat for several."),
    pooling: list[str] = typer.Option([], "--pooling", help="Pooling(s); default: each encoder's; 'all' for every one."),
    dtype: str = typer.Option("float16", help="float16 (default) or float32."),
    batch_size: int = typer.Option(64, help="Rows per forward pass."),
    shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, help="Rows per store shard (the unit of work and resume)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images instead of stopping."),
    engine: str = typer.Option("local", help="local or ray (one Ray task per shard)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local one)."),
    loaders: str = typer.Option("auto", help="processes, threads or auto (processes for image encoders on CPU)."),
    loader_workers: int = typer.Option(2, help="Loader processes or threads that decode and preprocess ahead of the model."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads on CPU (0: every CPU available to the process)."),
    wait: Optional[float] = typer.Option(None, "--wait", help="Give up after this many seconds without progress on "
                                         "shards other workers hold (default: wait until their claims lapse)."),
    entry_format: int = typer.Option(2, help="Layout of new entries: 2 (sharded, reads cost what they return) or 1 "
                                     "(one chunk per shard, as stores before layout 2); a complete entry in either "
                                     "layout is reused."),
    precision: str = typer.Option("fp32", help="Forward precision: fp32 (default), bf16 (autocast; needs a CUDA GPU "
                                  "or a CPU with avx512_bf16/AMX) or auto (bf16 where the device has it). Part of "
                                  "the entry's key when not fp32."),
    store: Optional[str] = StoreOption,
) -> None:
    """Run each encoder once over a dataset; write every layer's pooled features to the store."""
    import polars as pl

    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.store.feature_store import FeatureStore

    cfg = ExtractConfig(encoders=tuple(encoder), poolings=tuple(pooling), dtype=dtype, batch_size=batch_size,
                        shard_rows=shard_rows, device=device, skip_bad=skip_bad, loaders=loaders,
                        loader_workers=loader_workers,
                        torch_threads=torch_threads, claim_wait_s=wait, entry_format=entry_format,
                        precision=precision)
    fs = FeatureStore.open(store_url(store), "a")
    reports = extract(fs, dataset, cfg, engine=engine, ray_address=ray_address)
    rows = [{"encoder": r.encoder, "shards encoded": r.shards_encoded, "of": r.shards_total,
             "rows": r.rows_encoded, "rows/s": round(r.rows_per_s, 1), "bad rows": len(r.bad_rows),
             "seconds": round(r.wall_s, 2)} for r in reports]
    print_table(pl.DataFrame(rows), title=f"extract {dataset} -> {fs.url}")
    for r in reports:
        if r.bad_rows:
            console.print(f"[yellow]{r.encoder}: {len(r.bad_rows)} unreadable row(s) recorded: {r.bad_rows[:10]}")
