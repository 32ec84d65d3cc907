"""A cell's choice with its margin over the runner-up point (stages.runs.choice_margin): paired by seed, a 95 %
interval from resampling the seeds; a near-tie is said in tuning.csv and report.md."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from levels_store import FAST, levels_store

from stratalign.report.report import choice_lines
from stratalign.stages.runs.cells import CellChoice, PointResult, choose_cells
from stratalign.stages.runs.choice_margin import choice_margin
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.sweep import tuning_table

CELL = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", objective="clip+structure")


def _point(lam: float, per_seed: list[float], best_step: int = 20) -> PointResult:
    curves = tuple((v - 5.0, v, v - 1.0) for v in per_seed)  # steps 10, 20, 30
    mean = tuple(float(np.mean(c)) for c in zip(*curves))
    return PointResult({"lam": lam}, tuple(f"r{lam}-{i}" for i in range(len(per_seed))), (10, 20, 30), mean,
                       best_step, float(np.mean(per_seed)), curves)


def _choice(points: tuple[PointResult, ...], metric: str = "rsum") -> CellChoice:
    best = points[0]
    return CellChoice(CELL, tuple(range(len(best.runs))), metric, metric, best.knobs, best.best_step, best.best_value,
                      points, (), best.runs)


def test_a_margin_every_seed_agrees_on_is_clear_and_a_seed_split_one_is_not() -> None:
    clear = choice_margin(_choice((_point(10.0, [200, 210, 190, 205, 195]), _point(3.0, [190, 200, 181, 194, 186]))))
    assert clear is not None and clear.runner_up == {"lam": 3.0}
    assert clear.margin == pytest.approx(np.mean([10, 10, 9, 11, 9])) and clear.clear and clear.low > 0
    tie = choice_margin(_choice((_point(10.0, [200, 210, 190, 205, 195]), _point(3.0, [205, 200, 195, 200, 194]))))
    assert tie is not None and tie.margin == pytest.approx(1.2) and not tie.clear and tie.low < 0 < tie.high
    assert choice_margin(_choice((_point(10.0, [1.0, 2.0]),))) is None  # one point: nothing to beat


def test_a_k_fold_cell_resamples_seeds_not_folds() -> None:
    """Two seeds x two folds: the folds of a seed are averaged before the seeds are resampled, so the interval has
    only the two seed means' spread (resampling the four runs would give values between them too)."""
    chosen, other = _point(10.0, [200, 204, 210, 218]), _point(3.0, [200, 200, 204, 204])  # runs' margins 0, 4, 6, 14
    choice = CellChoice(CELL, (0, 1), "rsum", "rsum", chosen.knobs, 20, chosen.best_value, (chosen, other), (),
                        ("f0", "f1"), folds=2)
    got = choice_margin(choice)
    assert got is not None and got.margin == pytest.approx(6.0)
    assert (got.low, got.high) == (pytest.approx(2.0), pytest.approx(10.0))  # the seed means 2 and 10 bound it


def test_a_loss_is_better_lower() -> None:
    got = choice_margin(_choice((_point(1.0, [2.0, 2.1, 1.9]), _point(3.0, [3.0, 3.1, 2.9])), "clip_loss"))
    assert got is not None and got.margin == pytest.approx(1.0) and got.clear


def test_tuning_table_and_report_carry_the_margin(tmp_path) -> None:
    store = levels_store(tmp_path, images=120)
    cfgs = [RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST,
                      validation="split", objective="clip+structure", seed=s) for s in range(3)]
    choices, _ = choose_cells(store, cfgs, tune=True)
    table = tuning_table(choices)
    chosen = table.filter(pl.col("chosen")).row(0, named=True)
    (choice,) = choices
    point = next(p for p in choice.points if p.knobs == choice.knobs)
    runner = max((p for p in choice.points if p.knobs != choice.knobs), key=lambda p: p.best_value)
    at = lambda p: np.array(p.curves)[:, p.steps.index(p.best_step)]  # noqa: E731
    assert chosen["margin"] == pytest.approx(float((at(point) - at(runner)).mean()))
    assert chosen["margin_low"] <= chosen["margin"] <= chosen["margin_high"]
    assert chosen["clear_choice"] == (chosen["margin_low"] > 0)
    assert table.filter(~pl.col("chosen"))["margin"].null_count() == table.height - 1
    line = choice_lines(table.with_columns(pl.lit(False).alias("clear_choice")))[0]
    assert "a near-tie: the runner-up" in line and chosen["runner_up"] in line
    assert "near-tie" not in choice_lines(table.with_columns(pl.lit(True).alias("clear_choice")))[0]
    same = table.with_columns(pl.lit(False).alias("clear_choice"), pl.lit(0.0).alias("margin_low"),
                              pl.lit(0.0).alias("margin_high"))
    assert "an exact tie with the runner-up" in choice_lines(same)[0]
