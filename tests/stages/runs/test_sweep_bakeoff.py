"""The bake-off page of a sweep (report.bakeoff): every method x n with its paired interval against CLIP on the same
layers and its cost, and the baselines (ASIF, Procrustes, FuseMix) chosen and reported like every objective.

The store holds a small labelled table encoded by the tiny deterministic encoders of fake_encoders.py.
"""

from __future__ import annotations

import polars as pl
import pytest
from levels_store import FAST, levels_store

from stratalign.report.bakeoff import BASELINES
from stratalign.stages.layers import LayersConfig, run_layers
from stratalign.stages.runs.sweep import SweepConfig, run_sweep
from stratalign.stages.runs.training import RunConfig
from stratalign.store.runs import RunRegistry

OBJECTIVES = ("clip",) + BASELINES


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("bakeoff")
    fs = levels_store(root)
    run_layers(fs, LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("mutual_knn",), k=5),
               "best", "mutual_knn")  # the chosen pair (rule auto)
    base = RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", options=FAST)
    cfg = SweepConfig(base=base, n_pairs=(20, None), seeds=(0, 1), objectives=OBJECTIVES, layer_rules=("last", "auto"),
                      skip=tuple(("auto", o) for o in BASELINES), tune=True)
    out = root / "out"
    return fs, run_sweep(fs, cfg, str(out), progress=False), out


def test_bakeoff_page_has_every_method_by_n_with_intervals_against_clip_and_costs(swept) -> None:
    fs, res, out = swept
    md = (out / "bakeoff.md").read_text()
    assert "bakeoff.md" in (out / "report.md").read_text() and (out / "bakeoff.png").stat().st_size > 0
    # one table per headline metric; rows: the baseline first, then every method; columns: every n, then the costs
    tables = [block for block in md.split("\n## ")[1:]]
    assert [t.splitlines()[0] for t in tables] == ["image→text R@1", "text→image R@1", "zero-shot top-1"]
    rows = [line for line in tables[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| method | n=20 | n=all | s / run | s / cell |"
    methods = [r.split(" | ")[0].lstrip("| ") for r in rows[1:]]
    assert methods == ["clip / last", "clip / chosen", "asif / last", "procrustes / last", "clip+fusemix / last"]
    # each cell against CLIP on the same layers: the numbers are the comparisons' (paired, two-level)
    long = pl.read_csv(out / "bakeoff.csv")
    cmp = res.comparisons.filter((pl.col("metric") == "i2t_R@1") & pl.col("n_pairs").is_null())
    for obj in BASELINES:
        r = cmp.filter((pl.col("objective") == obj) & (pl.col("comparison") == "vs_last")).row(0, named=True)
        got = long.filter((pl.col("objective") == obj) & (pl.col("metric") == "i2t_R@1")
                          & pl.col("n_pairs").is_null()).row(0, named=True)
        assert (got["diff"], got["diff_low"], got["diff_high"]) == pytest.approx((r["diff"], r["low"], r["high"]))
        line = next(x for x in rows if x.startswith(f"| {obj} / last"))
        assert f"Δ {r['diff']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]" in line
    # clip on the chosen layers is compared with clip on the chosen layers: itself, no difference shown
    assert "Δ" not in rows[1] and "Δ" not in rows[2]
    assert long.filter(pl.col("objective") == "clip")["diff"].null_count() == long.filter(
        pl.col("objective") == "clip").height
    assert set(long["metric"]) >= {"i2t_R@1", "t2i_R@1", "zs_top1", "i2t_R@10"}
    # costs: every method's final runs and each cell's whole choice (grid points x seeds, then the final runs)
    costs = res.costs
    assert costs.height == 2 * (len(OBJECTIVES) + 1) and (costs["run_seconds"] >= 0).all()
    asif = costs.filter(pl.col("objective") == "asif")
    assert (asif["runs"] >= 3 * 2).all()  # the power grid x 2 seeds (closed form: the chosen point's runs are final)
    fusemix = costs.filter(pl.col("objective") == "clip+fusemix")
    assert (fusemix["runs"] >= 3 * 2 + 2).all()  # the alpha grid x 2 seeds, then 2 final runs
    assert (costs["cell_seconds"] >= costs["run_seconds"]).all()
    for r in rows[1:]:  # a closed-form fit of 20-65 toy pairs may take under a millisecond (recorded as 0.0)
        seconds = float(r.rstrip(" |").split(" | ")[-2])
        assert seconds > 0 if r.startswith(("| clip", "| clip+fusemix")) else seconds >= 0


def test_baselines_go_through_the_cell_choice_and_the_bottom_line(swept) -> None:
    fs, res, out = swept
    tuning = res.tuning
    # ASIF's power and FuseMix's alpha are chosen on validation from their grids, like lambda or beta
    assert set(tuning.filter(pl.col("objective") == "asif")["knobs"].str.extract(r"^(\w+)=").to_list()) == {
        "asif_power"}
    assert set(tuning.filter(pl.col("objective") == "clip+fusemix")["knobs"].str.extract(r"^(\w+)=").to_list()) == {
        "mixup_alpha"}
    chosen = tuning.filter((pl.col("objective") == "clip+fusemix") & pl.col("chosen"))
    assert chosen.height == 2 and chosen["step"].null_count() == 0
    report = (out / "report.md").read_text()
    bottom = report.split("## Bottom line")[1].split("\n## ")[0]
    assert "Baselines against clip on the same layers" in bottom
    for obj in BASELINES:
        assert f"{obj} / last" in bottom
    # a stacked run records its share of the stack's wall time, never more than the stack's time until it stopped
    registry = RunRegistry(fs)
    for rid in res.runs.filter(pl.col("objective").is_in(["clip", "clip+fusemix"]))["run"]:
        met = registry.metrics(rid)
        assert 0 < met["train_share_seconds"] <= met["train_seconds"] + 1e-3
