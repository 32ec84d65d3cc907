"""report.compare.with_choice_ties: each comparison says which side rests on a knob choice that was a near-tie on
validation; report.md marks those clear verdicts and counts them, bakeoff.md marks their differences."""

from __future__ import annotations

import numpy as np
import polars as pl

from stratalign.report.bakeoff import bakeoff_long, bakeoff_table
from stratalign.report.compare import cell_intervals, paired_comparisons, with_choice_ties
from stratalign.report.naming import TIE_MARK
from stratalign.report.report import bottom_line, findings

ROWS = np.arange(60)
CELLS = [("clip", "last", "linear"), ("clip", "auto", "linear"), ("clip+ib", "auto", "linear"),
         ("csa", "auto", "csa")]


def _grid() -> tuple[pl.DataFrame, dict]:
    """A small grid's runs and per-query hits: clip+ib and CSA clearly better than CLIP, the layers no different."""
    rng = np.random.default_rng(0)
    runs, queries = [], {}
    for obj, rule, head in CELLS:
        for s in range(4):
            rid = f"{obj}-{rule}-{s}"
            runs.append({"run": rid, "objective": obj, "layer_rule": rule, "head": head, "n_pairs": 200, "seed": s})
            p = 0.8 if obj in ("clip+ib", "csa") else 0.3
            queries[rid] = {"i2t_R@1": (rng.random(60) < p).astype(float), "image_rows": ROWS}
    return pl.DataFrame(runs), queries


def _comparisons() -> pl.DataFrame:
    runs, queries = _grid()
    return paired_comparisons(runs, queries, metrics=("i2t_R@1",), resamples=1000)


def _tuning(ties: dict[tuple[str, str, str], bool | None]) -> pl.DataFrame:
    return pl.DataFrame([{"objective": o, "layer_rule": r, "head": h, "n_pairs": 200, "chosen": True,
                          "clear_choice": ties.get((o, r, h))} for o, r, h in CELLS],
                        schema_overrides={"clear_choice": pl.Boolean})


def test_each_side_of_a_comparison_is_looked_up_in_its_own_cell() -> None:
    table = with_choice_ties(_comparisons(), _tuning({("clip+ib", "auto", "linear"): False,
                                                      ("clip", "last", "linear"): False,
                                                      ("csa", "auto", "csa"): True}))
    got = {(r["comparison"], r["method"]): r["choice_tie"] for r in table.iter_rows(named=True)}
    assert got[("objective", "clip+ib")] == "method"  # against clip on the chosen layers, a clear choice
    assert got[("vs_last", "clip+ib / chosen")] == "both"  # against clip on the last layers, itself a near-tie
    assert got[("objective", "csa")] is None  # its own head; the baseline is clip's linear head, no near-tie there
    assert got[("vs_last", "csa / chosen")] == "baseline"
    assert got[("layers", "auto")] == "baseline"  # clip on the chosen layers against clip on the last layers
    untuned = with_choice_ties(_comparisons(), pl.DataFrame())
    assert untuned["choice_tie"].null_count() == untuned.height


def test_the_report_marks_clear_verdicts_on_a_near_tie_and_counts_them() -> None:
    table = with_choice_ties(_comparisons(), _tuning({("clip+ib", "auto", "linear"): False}))
    text = " ".join(findings(table, "i2t_R@1", "vs_last"))
    assert f"helps{TIE_MARK}" in text  # clip+ib's clear verdict
    assert text.count(TIE_MARK) == 1  # CSA's is clear without a near-tie; clip's own layers have no tie
    board = pl.DataFrame({"objective": ["clip"], "seeds": [4]})
    line = " ".join(bottom_line(table, board))
    assert "1 of the clear ones" in line and "near-tie" not in line.split("1 of the clear ones")[0]
    plain = " ".join(bottom_line(table.drop("choice_tie"), board))
    assert "of the clear ones" not in plain


def test_the_bakeoff_marks_a_clear_difference_on_a_near_tie() -> None:
    runs, queries = _grid()
    table = with_choice_ties(_comparisons(), _tuning({("clip+ib", "auto", "linear"): False}))
    long = bakeoff_long(cell_intervals(runs, queries, metrics=("i2t_R@1",), resamples=1000), table,
                        baseline_rule="last")
    cells = {r["method"]: r["n=200"] for r in bakeoff_table(long, "i2t_R@1").iter_rows(named=True)}
    assert cells["clip+ib / chosen"].endswith(TIE_MARK) and "Δ" in cells["clip+ib / chosen"]
    assert not cells["csa / chosen"].endswith(TIE_MARK)  # clear too, but its choice was not a near-tie
