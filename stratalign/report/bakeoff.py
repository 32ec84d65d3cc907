"""The bake-off page (bakeoff.md, bakeoff.csv, bakeoff.png): every method x every subset size of one sweep in one
table per headline metric, with the cost of each method on the machine that ran it.

A cell reads "mean [interval]; Δ diff [low, high]": the mean test metric over the cell's seeds with its two-level 95 %
interval (report.compare.cell_intervals), then the paired difference against the baseline (CLIP) on the SAME layers
with its two-level interval (report.compare: kind "objective" on the chosen layers, "vs_last" on the last layers),
so a method's row compares it with CLIP trained on exactly its features, seeds, subsets and test queries. Every
method went through the same per-cell choice (stages.runs.cells). Costs: `s / run` is the mean over the method's
final runs of the seconds each cost (a stacked run's share of its stack's wall time, else its own training or fit
time), `s / cell` the mean over its cells of every run the cell's choice trained (each grid point x seed, then the
final runs): what choosing and training the method cost on this machine.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

from stratalign.core.metric_registry import REGISTRY, VERDICT, shown_in
from stratalign.report.naming import TIE_MARK, method_label, n_name, tie_mark

KEY_METRICS = shown_in(VERDICT)  # bakeoff.csv: every metric the comparisons hold
HEADLINE = ("i2t_R@1", "t2i_R@1", "zs_top1")  # bakeoff.md: one table each (the report's headline metrics)
NAMES = {m.name: m.display for m in REGISTRY}
# the baselines users compare against (docs/method.md § 3.9): named in the bottom line and the bake-off's notes
BASELINES = ("asif", "procrustes", "clip+fusemix")
COST_COLUMNS = ("s / run", "s / cell")


def _n_order(values: list[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None}) + ([None] if None in values else [])


def _diffs(comparisons: pl.DataFrame, baseline_rule: str) -> dict[tuple, dict[str, Any]]:
    """(objective, layer rule, head, n, metric) -> the comparison with the baseline on the same layers."""
    out = {}
    if not comparisons.height:
        return out
    for r in comparisons.iter_rows(named=True):
        same = r["comparison"] == "objective" or (r["comparison"] == "vs_last" and r["layer_rule"] == baseline_rule)
        if same:
            out[(r["objective"], r["layer_rule"], r["head"], r["n_pairs"], r["metric"])] = r
    return out


def cost_by_method(costs: pl.DataFrame) -> dict[tuple, tuple[float, float]]:
    """(objective, layer rule, head) -> (mean seconds a final run, mean seconds a cell's whole choice)."""
    if not costs.height:
        return {}
    agg = costs.group_by("objective", "layer_rule", "head").agg(pl.col("run_seconds").mean(),
                                                                  pl.col("cell_seconds").mean())
    return {(r["objective"], r["layer_rule"], r["head"]): (r["run_seconds"], r["cell_seconds"])
            for r in agg.iter_rows(named=True)}


def bakeoff_long(intervals: pl.DataFrame, comparisons: pl.DataFrame, *, baseline: str = "clip",
                 baseline_rule: str = "last") -> pl.DataFrame:
    """One row per (method, n, metric): the cell's mean and interval, and its paired difference against the
    baseline on the same layers (null for the baseline itself)."""
    diffs = _diffs(comparisons, baseline_rule)
    rows = []
    for r in intervals.iter_rows(named=True) if intervals.height else ():
        d = diffs.get((r["objective"], r["layer_rule"], r["head"], r["n_pairs"], r["metric"]))
        rows.append({"method": method_label(r["objective"], r["layer_rule"]), "objective": r["objective"],
                     "layer_rule": r["layer_rule"], "head": r["head"], "n_pairs": r["n_pairs"], "metric": r["metric"],
                     "seeds": r["seeds"], "mean": r["mean"], "low": r["low"], "high": r["high"],
                     "baseline": method_label(baseline, r["layer_rule"]),
                     "diff": d and d["diff"], "diff_low": d and d["low"], "diff_high": d and d["high"],
                     "verdict": d and d["verdict"], "choice_tie": d and d.get("choice_tie")})
    return pl.DataFrame(rows, infer_schema_length=None)


def bakeoff_table(long: pl.DataFrame, metric: str, costs: dict[tuple, tuple[float, float]] | None = None,
                  baseline: str = "clip") -> pl.DataFrame:
    """Rows: methods (the baseline's first); columns: subset sizes, then the costs. A cell: 'mean [low, high]' and,
    against the baseline on the same layers, '; Δ diff [low, high]'."""
    rows = long.filter(pl.col("metric") == metric) if long.height else long
    if not rows.height:
        return pl.DataFrame()
    order = _n_order(rows["n_pairs"].to_list())
    methods = list(dict.fromkeys(rows.sort(pl.col("objective") != baseline, maintain_order=True)
                                 .select("method", "objective", "layer_rule", "head").iter_rows()))
    out = []
    for method, objective, rule, head in methods:
        line: dict[str, Any] = {"method": method if head in ("linear", objective) else f"{method} ({head})"}
        for n in order:
            got = rows.filter((pl.col("method") == method) & (pl.col("head") == head) & pl.col("n_pairs").eq_missing(n))
            text = ""
            if got.height:
                r = got.row(0, named=True)
                text = f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]"
                if r["diff"] is not None:
                    text += f"; Δ {r['diff']:+.1f} [{r['diff_low']:+.1f}, {r['diff_high']:+.1f}]{tie_mark(r)}"
            line[f"n={n_name(n)}"] = text
        run_s, cell_s = (costs or {}).get((objective, rule, head), (None, None))
        line["s / run"] = "" if run_s is None else f"{run_s:.3g}"
        line["s / cell"] = "" if cell_s is None else f"{cell_s:.3g}"
        out.append(line)
    return pl.DataFrame(out)


def write_bakeoff(out_dir: str, intervals: pl.DataFrame, comparisons: pl.DataFrame, costs: pl.DataFrame, *,
                  baseline: str = "clip", baseline_rule: str = "last", title: str = "Bake-off",
                  metrics: tuple[str, ...] = HEADLINE) -> dict[str, str]:
    """bakeoff.md (one table per headline metric), bakeoff.csv (every row of those tables, long) and bakeoff.png
    (each method's difference against the baseline on the same layers); returns their paths."""
    from stratalign.report.report import markdown_table

    long = bakeoff_long(intervals, comparisons, baseline=baseline, baseline_rule=baseline_rule)
    if not long.height:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    files = {"bakeoff_csv": os.path.join(out_dir, "bakeoff.csv"), "bakeoff_md": os.path.join(out_dir, "bakeoff.md")}
    long.write_csv(files["bakeoff_csv"])
    cost = cost_by_method(costs)
    seeds = sorted(set(long["seeds"].to_list()))
    md = [f"# {title}", "",
          f"Every method x every subset size of one sweep: the same splits, subsets and seeds ({', '.join(map(str, seeds))} "
          "per cell), each cell chosen on validation by the same rule (its stopping step and its knobs from its grid). "
          "A cell: the mean test metric over seeds in % with its 95 % two-level bootstrap interval (seeds, then test "
          f"queries), then Δ: the paired difference against {baseline} on the same layers (the same features, seeds, "
          "subsets and test queries) with its two-level interval; 'helps' / 'hurts' only where that interval excludes 0; "
          f"{TIE_MARK.strip()} after such a Δ: the method's or the baseline's knobs were a near-tie on validation "
          "(report.md, \"Chosen on validation\"). "
          "`s / run`: seconds a final run cost on this machine (a run trained in a stack: its share of the stack's wall "
          "time; a closed form: its fit), mean over the method's runs; `s / cell`: seconds of every run one cell's "
          "choice trained (each grid point x seed, then the final runs), mean over the method's cells. Scoring on the "
          "test split is not counted.", ""]
    for metric in metrics:
        table = bakeoff_table(long, metric, cost, baseline)
        if table.height:
            md += [f"## {NAMES.get(metric, metric)}", "", markdown_table(table), ""]
    clear = long.filter(pl.col("verdict").is_not_null() & (pl.col("verdict") != "no clear difference")
                        & pl.col("metric").is_in(metrics))
    md += [f"Clear differences against {baseline} on the same layers: {clear.height} of "
           f"{long.filter(pl.col('verdict').is_not_null() & pl.col('metric').is_in(metrics)).height} "
           "(method, n, metric) cells" + (": " + "; ".join(
               f"{r['method']} n={n_name(r['n_pairs'])} {NAMES.get(r['metric'], r['metric'])} {r['diff']:+.1f} "
               f"[{r['diff_low']:+.1f}, {r['diff_high']:+.1f}] {r['verdict']}" for r in clear.iter_rows(named=True))
               if clear.height else "") + ".", ""]
    png = _plot(long, os.path.join(out_dir, "bakeoff.png"), metrics, baseline)
    if png:
        files["bakeoff_png"] = png
        md += [f"![Difference against {baseline} on the same layers]({os.path.basename(png)})", ""]
    with open(files["bakeoff_md"], "w") as f:
        f.write("\n".join(md) + "\n")
    return files


def _plot(long: pl.DataFrame, path: str, metrics: tuple[str, ...], baseline: str) -> str | None:
    from stratalign.report.plots import intervals_vs_pairs

    rows = [{**r, "value": r["diff"], "low": r["diff_low"], "high": r["diff_high"]}
            for r in long.filter(pl.col("diff").is_not_null()).iter_rows(named=True)]
    shown = [m for m in metrics if any(r["metric"] == m for r in rows)]
    if not shown:
        return None
    return intervals_vs_pairs(rows, path, shown, zero_line=True, ylabel="difference (points of %)",
                              title=f"Each method against {baseline} on the same layers (95 % two-level interval)")
