"""Paired statistics (core.stats), the comparisons built on them (report.compare) and how reports show them."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stratalign.core.stats import HELPS, HURTS, NO_CLEAR, majority_rate, paired_bootstrap, seed_spread, verdict
from stratalign.errors import StratalignError
from stratalign.report.compare import paired_comparisons
from stratalign.report.leaderboard import aggregate
from stratalign.report.report import findings, results_table, write_report


def _naive_interval(a: list[np.ndarray], b: list[np.ndarray], resamples: int, seed: int) -> tuple[float, float, float]:
    """The definition, spelled out: per resample, one draw of the queries for both methods and every seed, the
    per-seed difference of the means, averaged over seeds; the 2.5 / 97.5 percentiles of those averages."""
    rng = np.random.default_rng(seed)
    n = len(a[0])
    stats = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        per_seed = [np.mean(a[s][idx]) - np.mean(b[s][idx]) for s in range(len(a))]
        stats.append(sum(per_seed) / len(per_seed))
    diff = np.mean([np.mean(a[s]) - np.mean(b[s]) for s in range(len(a))])
    low, high = np.percentile(stats, [2.5, 97.5])
    return 100 * diff, 100 * low, 100 * high


def test_bootstrap_matches_a_direct_resampling_loop() -> None:
    rng = np.random.default_rng(5)
    a = [rng.random(37) < p for p in (0.5, 0.55, 0.6)]
    b = [rng.random(37) < p for p in (0.4, 0.45, 0.5)]
    got = paired_bootstrap(a, b, resamples=1500, seed=11)
    diff, low, high = _naive_interval(a, b, 1500, 11)
    assert (got.diff, got.low, got.high) == pytest.approx((diff, low, high), abs=1e-9)
    assert got.seeds == 3 and got.queries == 37 and got.low < got.diff < got.high
    assert paired_bootstrap(a, b, resamples=1500, seed=11) == got  # seeded: the same interval again
    assert paired_bootstrap(a, b, resamples=1500, seed=12) != got


def test_pairing_narrows_the_interval_of_correlated_methods() -> None:
    """A method that fixes 15 of 200 baseline misses: paired, the interval excludes 0 even though the two hit
    rates are within each other's unpaired noise."""
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.4
    better = base.copy()
    better[np.flatnonzero(~base)[:15]] = True
    res = paired_bootstrap([better], [base], seed=0)
    assert res.diff == pytest.approx(7.5) and res.low > 0 and res.verdict == HELPS
    assert paired_bootstrap([base], [better], seed=0).verdict == HURTS


def test_verdict_rule() -> None:
    assert verdict(0.1, 3.0) == HELPS
    assert verdict(-3.0, -0.1) == HURTS
    assert verdict(-0.5, 2.0) == NO_CLEAR and verdict(0.0, 2.0) == NO_CLEAR
    same = np.array([1, 0, 1, 1, 0], bool)
    assert paired_bootstrap([same], [same]).verdict == NO_CLEAR


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(StratalignError, match="same seeds and queries"):
        paired_bootstrap([np.ones(5)], [np.ones(6)])
    with pytest.raises(StratalignError, match="at least 1000 resamples"):
        paired_bootstrap([np.ones(5)], [np.ones(5)], resamples=100)
    with pytest.raises(StratalignError, match="no seeds"):
        paired_bootstrap([], [])


def test_majority_rate_and_seed_spread() -> None:
    assert majority_rate(np.array([0, 0, 1, 2, 0])) == pytest.approx(60.0)
    assert seed_spread([3.0]) == (3.0, None)
    mean, std = seed_spread([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(np.sqrt(2))


def _runs_and_queries(seeds: tuple[int, ...]) -> tuple[pl.DataFrame, dict]:
    """clip and clip+structure at two layer rules; structure hits every query clip hits plus 40 more."""
    rng = np.random.default_rng(1)
    rows, queries = [], {}
    n_img, n_cap = 300, 600
    for rule in ("last", "auto"):
        for seed in seeds:
            base = {"i2t_R@1": rng.random(n_img) < 0.3, "t2i_R@1": rng.random(n_cap) < 0.3,
                    "zs_top1": rng.random(n_img) < 0.4, "image_rows": np.arange(n_img), "caption_rows": np.arange(n_cap)}
            better = {**base, "i2t_R@1": base["i2t_R@1"].copy()}
            better["i2t_R@1"][np.flatnonzero(~base["i2t_R@1"])[:40]] = True
            for obj, q in (("clip", base), ("clip+structure", better)):
                rid = f"{obj}-{rule}-{seed}"
                rows.append({"run": rid, "objective": obj, "head": "linear", "layer_rule": rule, "n_pairs": 100,
                             "seed": seed, "i2t_R@1": 100 * q["i2t_R@1"].mean(), "t2i_R@1": 100 * q["t2i_R@1"].mean(),
                             "zs_top1": 100 * q["zs_top1"].mean()})
                queries[rid] = q
    return pl.DataFrame(rows), queries


def test_comparisons_pair_runs_by_cell_and_seed() -> None:
    runs, queries = _runs_and_queries((0, 1, 2))
    table = paired_comparisons(runs, queries)
    obj = table.filter(pl.col("comparison") == "objective")
    assert set(obj["method"]) == {"clip+structure"} and set(obj["baseline"]) == {"clip"}
    # on the last layers the same-layer comparison is the vs_last one (not listed twice)
    i2t = obj.filter(pl.col("metric") == "i2t_R@1")
    assert i2t.height == 1 and set(i2t["verdict"]) == {HELPS} and set(i2t["seeds"]) == {3}
    assert i2t["diff"].to_list() == pytest.approx([100 * 40 / 300])
    assert set(obj.filter(pl.col("metric") == "t2i_R@1")["verdict"]) == {NO_CLEAR}  # identical hits
    assert obj.filter(pl.col("metric") == "t2i_R@1")["query_unit"].to_list() == ["captions"]
    layers = table.filter(pl.col("comparison") == "layers")
    assert set(layers["method"]) == {"auto"} and set(layers["objective"]) == {"clip", "clip+structure"}
    text = " ".join(findings(table, "i2t_R@1"))
    assert "**clip+structure** vs clip on the same layers, image→text R@1: helps in 1 cells, hurts in 0, no clear " \
           "difference in 0" in text
    vs_last = table.filter((pl.col("comparison") == "vs_last") & (pl.col("metric") == "i2t_R@1"))
    assert set(vs_last["method"]) == {"clip / chosen", "clip+structure / chosen", "clip+structure / last"}
    assert set(vs_last["baseline"]) == {"clip"} and set(vs_last["baseline_rule"]) == {"last"}


def test_comparisons_need_the_same_queries() -> None:
    runs, queries = _runs_and_queries((0,))
    queries["clip-last-0"] = {**queries["clip-last-0"], "image_rows": np.arange(1, 301)}
    table = paired_comparisons(runs, queries, metrics=("i2t_R@1",))
    assert table.filter(pl.col("comparison") == "objective")["layer_rule"].to_list() == ["auto"]


def test_one_seed_shows_no_spread(tmp_path) -> None:
    runs, queries = _runs_and_queries((0,))
    board = aggregate(runs.drop("run"))
    assert board["i2t_R@1_std"].null_count() == board.height  # no spread with one seed, not a std of 0
    table = results_table(board)
    assert not any("±" in str(v) for row in table.iter_rows() for v in row)
    path = write_report(str(tmp_path), title="t", board=board, layer_info=None, files={},
                        comparisons=paired_comparisons(runs, queries))
    text = open(path).read()
    assert not any("±" in line for line in text.splitlines() if line.startswith("|"))
    assert "at least 5 seeds" in text and "## Bottom line" in text
    three = aggregate(_runs_and_queries((0, 1, 2))[0].drop("run"))
    assert all("±" in v for v in results_table(three)["image→text R@1"].to_list())


def test_two_level_bootstrap_matches_a_direct_two_level_loop() -> None:
    """Seeds drawn with replacement, then one query draw shared by every drawn seed: the same numbers as a plain
    loop over resamples that does exactly that (the same Generator draws, in the same order)."""
    from stratalign.core.stats import _CHUNK, two_level_bootstrap

    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, size=(4, 30)).astype(float)
    b = rng.integers(0, 2, size=(4, 30)).astype(float)
    got = two_level_bootstrap(list(a), list(b), resamples=1000, seed=7)
    g = np.random.default_rng(7)
    boot = []
    for start in range(0, 1000, _CHUNK):
        r = min(_CHUNK, 1000 - start)
        seeds = g.integers(0, 4, size=(r, 4))
        queries = g.integers(0, 30, size=(r, 30))
        boot += [float((a - b)[s][:, q].mean()) for s, q in zip(seeds, queries)]
    low, high = np.percentile(boot, [2.5, 97.5])
    assert got.diff == pytest.approx(100 * (a - b).mean()) and got.seeds == 4 and got.queries == 30
    assert got.low == pytest.approx(100 * low) and got.high == pytest.approx(100 * high)


def test_seed_variance_widens_the_interval() -> None:
    """Seeds that disagree (one helps a lot, one hurts) give a wide two-level interval where the query-only
    bootstrap, which treats the seeds as fixed, gives a narrow one that excludes 0."""
    from stratalign.core.stats import paired_bootstrap, two_level_bootstrap

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=(4, 400)).astype(float)
    method = base.copy()
    for s, shift in enumerate((0.3, 0.25, -0.05, 0.3)):  # per-seed effects: +30, +25, -5, +30 points
        flip = rng.random(400) < abs(shift)
        method[s][flip] = 1.0 if shift > 0 else 0.0
    narrow = paired_bootstrap(list(method), list(base), resamples=2000)
    wide = two_level_bootstrap(list(method), list(base), resamples=2000)
    assert wide.half_width > 1.5 * narrow.half_width and narrow.verdict == "helps"
    one = two_level_bootstrap([method[0]], [base[0]], resamples=2000)
    alone = paired_bootstrap([method[0]], [base[0]], resamples=2000)
    assert one.half_width == pytest.approx(alone.half_width, rel=0.15)  # one seed: the query bootstrap


def test_queries_to_resolve() -> None:
    from stratalign.core.stats import queries_to_resolve

    assert queries_to_resolve(363, 4.0, 2.0) == 363 * 4 and queries_to_resolve(100, 1.0, 0.0) is None
