"""`stratalign demo`: the main job on the embedded default."""

from __future__ import annotations

from typing import Optional

import typer

from stratalign.cli.common import StoreOption, console, print_table, store_url


def demo_cmd(
    out: str = typer.Option("stratalign-report", help="Report folder (report.md, PNGs, leaderboard)."),
    limit: Optional[int] = typer.Option(None, help="Only N emoji, taken in turn from each category (a quick look)."),
    seeds: int = typer.Option(5, help="Seeds per cell (docs/method.md: at least 5 where a report draws conclusions)."),
    precision: str = typer.Option("fp32", help="fp32 (default), bf16 or auto: the encoders' forward and the heads' "
                                  "matmuls (bf16 needs a CPU with avx512_bf16/AMX or a CUDA GPU; auto: bf16 where "
                                  "there is one)."),
    store: Optional[str] = StoreOption,
) -> None:
    """The main job on the embedded default: Twemoji, 3 packaged encoders, layer choice, sweep, report."""
    from stratalign.stages.demo import DemoConfig, run_demo

    res = run_demo(store_url(store), out, DemoConfig.sized(limit, seeds, precision), log=console.print)
    print_table(res["table"], title="demo results (test split, mean ± std over seeds)")
    console.print(f"report: {res['report']}")
