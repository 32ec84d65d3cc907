"""The sweep report (report.md): a bottom line, the table, the cells' choices, the verdicts and the plots.

Every sentence is generated from the numbers: "helps" / "hurts" only where the two-level 95 % interval of the
paired difference (report.compare, core.stats.two_level_bootstrap) excludes 0, "no clear difference" otherwise,
always with the interval and the baseline named. `sweep` and `demo` write it with the same function.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

from stratalign.core.metric_registry import REGISTRY, TABLE, shown_in
from stratalign.core.stats import HELPS, HURTS, NO_CLEAR, queries_to_resolve
from stratalign.report.bakeoff import BASELINES
from stratalign.report.naming import TIE_MARK, method_label, n_name, rule_name, tie_mark

KEY_METRICS = ("i2t_R@1", "t2i_R@1", "zs_top1")  # the headline: what the bottom line and the findings speak of
TABLE_METRICS = shown_in(TABLE)  # core.metric_registry
NAMES = {m.name: m.display for m in REGISTRY}
MIN_SEEDS = 5  # docs/method.md: at least 5 seeds where a report draws conclusions


def _iv(r: dict[str, Any]) -> str:
    return f"{r['diff']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]"


def _largest_n(values: list[Any]) -> Any:
    return None if None in values else max(values)


def results_table(board: pl.DataFrame, intervals: pl.DataFrame | None = None,
                  metrics: tuple[str, ...] = TABLE_METRICS) -> pl.DataFrame:
    """One row per cell: the mean over seeds with its two-level 95 % interval where the per-query results exist
    (`intervals`), else mean ± sample std (mean alone for one seed); the majority-class rate beside zero-shot."""
    iv = {}
    if intervals is not None and intervals.height:
        for r in intervals.iter_rows(named=True):
            iv[(r["objective"], r["layer_rule"], r["head"], r["n_pairs"], r["metric"])] = r
    rows = []
    for r in board.iter_rows(named=True):
        row = {"method": method_label(r["objective"], r["layer_rule"]), "head": r["head"], "n": n_name(r["n_pairs"]),
               "seeds": r.get("seeds")}
        for m in metrics:
            if f"{m}_mean" not in r or r[f"{m}_mean"] is None:
                continue
            got = iv.get((r["objective"], r["layer_rule"], r["head"], r["n_pairs"], m))
            if got is not None:
                row[NAMES.get(m, m)] = f"{got['mean']:.1f} [{got['low']:.1f}, {got['high']:.1f}]"
            elif r.get(f"{m}_std") is not None:
                row[NAMES.get(m, m)] = f"{r[f'{m}_mean']:.1f} ± {r[f'{m}_std']:.1f}"
            else:
                row[NAMES.get(m, m)] = f"{r[f'{m}_mean']:.1f}"
        if r.get("zs_majority") is not None:
            row["majority class"] = f"{r['zs_majority']:.1f}"
        if r.get("best_step_mean") is not None:
            row["stop step"] = f"{r['best_step_mean']:.0f}"
        rows.append(row)
    return pl.DataFrame(rows)


def findings(comparisons: pl.DataFrame, metric: str, kind: str = "objective") -> list[str]:
    """Plain sentences, one per method: each cell's paired difference with its interval and verdict, and counts."""
    if comparisons.height == 0:
        return []
    rows = comparisons.filter((pl.col("comparison") == kind) & (pl.col("metric") == metric))
    lines = []
    for method in rows["method"].unique(maintain_order=True).to_list():
        cells, counts = [], {HELPS: 0, HURTS: 0, NO_CLEAR: 0}
        for r in rows.filter(pl.col("method") == method).iter_rows(named=True):
            where = (f"{rule_name(r['layer_rule'])} layers, " if kind in ("objective", "control") else
                     "" if kind == "vs_last" else f"{r['objective']}, ") + f"n={n_name(r['n_pairs'])}"
            cells.append(f"{where}: {_iv(r)} {r['verdict']}{tie_mark(r)}")
            counts[r["verdict"]] += 1
        r0 = rows.filter(pl.col("method") == method).row(0, named=True)
        what = {"objective": f"**{method}** vs {r0['baseline']} on the same layers",
                "vs_last": f"**{method}** vs {r0['baseline']} on the {rule_name(r0['baseline_rule'])} layers",
                "layers": f"**{rule_name(method)} layers** vs the {rule_name(r0['baseline'])} layers",
                "control": f"**{method}** vs {r0['baseline']}, the same cell without what it adds"}[kind]
        lines.append(f"{what}, {NAMES.get(metric, metric)}: helps in {counts[HELPS]} cells, hurts in {counts[HURTS]}, "
                     f"no clear difference in {counts[NO_CLEAR]}. Cells: {'; '.join(cells)}.")
    return lines


def resolution_lines(comparisons: pl.DataFrame) -> list[str]:
    """Per metric: the smallest difference the test split and seeds can resolve (the median half-width of the
    intervals of the comparisons against the baseline), and what the test split holds."""
    if comparisons.height == 0:
        return []
    out = []
    for metric in KEY_METRICS:
        rows = comparisons.filter(pl.col("metric") == metric)
        if rows.height:
            hw = float(rows["half_width"].median())
            r0 = rows.row(0, named=True)
            out.append(f"{NAMES[metric]}: differences smaller than about ±{hw:.1f} points cannot be told from 0 with "
                       f"{r0['queries']} test {r0['query_unit']} and {int(rows['seeds'].min())} seeds.")
    return out


def bottom_line(comparisons: pl.DataFrame, board: pl.DataFrame, baseline: str = "clip",
                baseline_rule: str = "last") -> list[str]:
    """Three to five sentences: which layers, which objective, how much against the baseline on the last layers
    (with intervals), or that the test split cannot tell them apart and how many test queries would; then one on
    the baselines (ASIF, Procrustes, FuseMix) where the sweep holds them."""
    if comparisons.height == 0 or board.height == 0:
        return ["No comparison could be made: the sweep needs the baseline "
                f"({method_label(baseline, baseline_rule)}) and at least one other method on the same seeds."]
    n_top = _largest_n(comparisons["n_pairs"].to_list())
    at = comparisons.filter(pl.col("n_pairs").eq_missing(n_top))
    base = method_label(baseline, baseline_rule)
    lines = []
    layers = at.filter((pl.col("comparison") == "layers") & (pl.col("objective") == baseline))
    if layers.height:
        parts = [f"{NAMES[m]} {_iv(r)}" for m in KEY_METRICS for r in layers.filter(pl.col("metric") == m).iter_rows(
            named=True)]
        verdicts = set(layers.filter(pl.col("metric").is_in(KEY_METRICS))["verdict"])
        word = _overall(verdicts)
        lines.append(f"Layers: for {baseline} with n={n_name(n_top)} pairs, the chosen layers against the last layers "
                     f"{word} ({'; '.join(parts)} points).")
    vs = at.filter((pl.col("comparison") == "vs_last") & pl.col("metric").is_in(KEY_METRICS))
    if vs.height:
        score = vs.group_by("method").agg(pl.col("diff").mean()).sort("diff", descending=True)
        best = score["method"][0]
        rows = vs.filter(pl.col("method") == best)
        parts = [f"{NAMES[r['metric']]} {_iv(r)} ({r['verdict']})" for r in rows.iter_rows(named=True)]
        lines.append(f"Objective: with n={n_name(n_top)} pairs the best method on average is **{best}**; against "
                     f"{base}: {'; '.join(parts)}.")
        objective, rule = rows["objective"][0], rows["layer_rule"][0]  # the method the label names
        same = at.filter((pl.col("comparison") == "objective") & (pl.col("objective") == objective)
                         & (pl.col("layer_rule") == rule) & pl.col("metric").is_in(KEY_METRICS))
        if same.height:
            parts = [f"{NAMES[r['metric']]} {_iv(r)}" for r in same.iter_rows(named=True)]
            lines.append(f"Against {baseline} on the same layers it {_overall(set(same['verdict']))} "
                         f"({'; '.join(parts)}): what the objective adds beyond the layer choice.")
        if set(rows["verdict"]) == {NO_CLEAR}:
            hw = float(rows["half_width"].median())
            d = float(rows["diff"].abs().max())
            need = queries_to_resolve(int(rows["queries"][0]), hw, d)
            lines.append(f"The test split ({int(rows['queries'][0])} {rows['query_unit'][0]}) cannot tell {best} from "
                         f"{base}: the intervals are about ±{hw:.1f} points wide"
                         + (f", and a difference of {d:.1f} points would need roughly {need:,} test queries (seed "
                            "variance aside)." if need else "."))
    allv = comparisons.filter((pl.col("comparison") == "vs_last") & pl.col("metric").is_in(KEY_METRICS))
    if allv.height:
        c = {v: int((allv["verdict"] == v).sum()) for v in (HELPS, HURTS, NO_CLEAR)}
        clear = allv.filter(pl.col("verdict") != NO_CLEAR)
        tied = int(clear["choice_tie"].is_not_null().sum()) if "choice_tie" in clear.columns else 0
        lines.append(f"Over every subset size, {c[HELPS] + c[HURTS]} of {allv.height} comparisons against {base} are "
                     f"clear ({c[HELPS]} helps, {c[HURTS]} hurts); the rest show no clear difference."
                     + (f" {tied} of the clear ones ({TIE_MARK.strip()} below) rest on a knob choice that validation "
                        "could not tell from its runner-up point." if tied else ""))
    return lines[:5] + baseline_lines(at, baseline, baseline_rule, n_top)


def baseline_lines(at: pl.DataFrame, baseline: str, baseline_rule: str, n: Any) -> list[str]:
    """One sentence on the baselines users compare against (report.bakeoff.BASELINES: ASIF, Procrustes, FuseMix),
    each against `baseline` on the same layers at subset size n, with intervals and verdicts."""
    same = at.filter(pl.col("objective").is_in(BASELINES) & pl.col("metric").is_in(KEY_METRICS)
                     & ((pl.col("comparison") == "objective")
                        | ((pl.col("comparison") == "vs_last") & (pl.col("layer_rule") == baseline_rule))))
    parts = []
    for method in same["method"].unique(maintain_order=True).to_list():
        rows = same.filter(pl.col("method") == method)
        label = method_label(rows["objective"][0], rows["layer_rule"][0])
        parts.append(f"{label} {_overall(set(rows['verdict']))} ("
                     + "; ".join(f"{NAMES[r['metric']]} {_iv(r)}" for r in rows.iter_rows(named=True)) + ")")
    if not parts:
        return []
    return [f"Baselines against {baseline} on the same layers with n={n_name(n)} pairs: {', '.join(parts)}; every "
            "method x n with its cost is in bakeoff.md."]


def _overall(verdicts: set[str]) -> str:
    if verdicts == {NO_CLEAR}:
        return "shows no clear difference"
    if HELPS in verdicts and HURTS in verdicts:
        return "helps on some metrics and hurts on others"
    return ("helps" if HELPS in verdicts else "hurts") + (" on some metrics" if NO_CLEAR in verdicts else "")


def choice_lines(tuning: pl.DataFrame | None) -> list[str]:
    """One line per cell: the knobs and the stopping step chosen on validation averaged over its seeds."""
    if tuning is None or tuning.height == 0:
        return []
    lines = []
    for r in tuning.filter(pl.col("chosen")).iter_rows(named=True):
        n_points = tuning.filter((pl.col("objective") == r["objective"]) & (pl.col("layer_rule") == r["layer_rule"])
                                 & pl.col("n_pairs").eq_missing(r["n_pairs"]) & (pl.col("head") == r["head"])).height
        knobs = f"{r['knobs']}, " if r["knobs"] else ""
        step = f"step {r['step']}" if r["step"] is not None else "closed form"
        edge = f" (on the edge of the {r['on_edge']} grid)" if r.get("on_edge") else ""
        over = f"{r['seeds']} seeds x {r['folds']} folds, then a refit on all pairs" if r.get("folds") else \
            f"{r['seeds']} seeds"
        tie = ""
        if r.get("clear_choice") is False and r["margin_low"] == r["margin_high"] == 0:
            tie = f"; an exact tie with the runner-up {r['runner_up']} on every seed (the earlier grid point is kept)"
        elif r.get("clear_choice") is False:  # stages.runs.choice_margin: the runner-up within the seeds' noise
            tie = (f"; a near-tie: the runner-up {r['runner_up']} is {r['margin']:.1f} behind, 95 % interval "
                   f"[{r['margin_low']:.1f}, {r['margin_high']:.1f}] over the seeds, so the choice could tip")
        lines.append(f"{method_label(r['objective'], r['layer_rule'])}, n={n_name(r['n_pairs'])}: {knobs}{step}, "
                     f"{r['metric']} {r['value']:.1f} (mean of {over}) among {n_points} point(s){edge}{tie}")
    return lines


def write_report(out_dir: str, *, title: str, board: pl.DataFrame, layer_info: dict[str, Any] | None,
                 files: dict[str, str], extra: list[str] | None = None, comparisons: pl.DataFrame | None = None,
                 tuning: pl.DataFrame | None = None, intervals: pl.DataFrame | None = None) -> str:
    """Write report.md into out_dir (PNG links are relative) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    comparisons = comparisons if comparisons is not None else pl.DataFrame()
    md = [f"# {title}", "", "## Bottom line", ""]
    md += [" ".join(bottom_line(comparisons, board)), ""]
    seeds = int(board["seeds"].min()) if "seeds" in board.columns and board.height else 0
    if 0 < seeds < MIN_SEEDS:
        md += [f"With {seeds} seed{'s' if seeds != 1 else ''} per cell the seed part of each interval rests on few "
               f"draws: at least {MIN_SEEDS} seeds are needed before drawing conclusions.", ""]
    if extra:
        md += extra + [""]
    if layer_info:
        md += ["## Layers", "",
               f"Similarity of every vision layer with every text layer on {layer_info['n']} train pairs "
               f"({layer_info['metric']}, k={layer_info['k']}). Chosen: vision layer {layer_info['vision_layer']} "
               f"[{layer_info['vision_name']}], text layer {layer_info['text_layer']} [{layer_info['text_name']}], "
               f"score {layer_info['score']:.3f}; last-layer pair: {layer_info['last_score']:.3f}.", ""]
        if layer_info.get("heatmap"):
            md += [f"![layer similarity]({os.path.basename(layer_info['heatmap'])})", ""]
    md += ["## Results (test split)", "",
           "Mean over seeds in %, with its 95 % two-level bootstrap interval (seeds, then test queries) in brackets "
           "(mean ± sample std where per-query results are missing). `majority class`: the accuracy of always "
           "guessing the test split's most frequent class, beside zero-shot. `stop step`: the step chosen for the "
           "cell on validation. CoMM has no retrieval space: `probe acc.` is a linear probe on its fused features, "
           "beside the same probe on the frozen features.", "", markdown_table(results_table(board, intervals)), ""]
    if comparisons.height:
        md += ["## What the numbers say", "",
               "Paired differences in points of %, mean over seeds of (method - baseline) on the same seeds, subsets "
               "and test queries, with a 95 % two-level bootstrap interval (seeds resampled, then queries: one query "
               "resample shared by both runs and every seed). \"helps\" / \"hurts\" only where the interval excludes "
               "0, otherwise \"no clear difference\"." + (
                   f" {TIE_MARK.strip()}: the method's (or the baseline's) knobs were a near-tie on validation (see "
                   "\"Chosen on validation\"), so a choice that could have gone to the runner-up point stands behind "
                   "that verdict." if "choice_tie" in comparisons.columns
                   and comparisons["choice_tie"].is_not_null().any() else ""), ""]
        for kind in ("vs_last", "objective", "layers", "control"):
            md += [f"- {line}" for m in KEY_METRICS for line in findings(comparisons, m, kind)]
        md += ["", "Smallest resolvable difference:", ""] + [f"- {x}" for x in resolution_lines(comparisons)] + [""]
    if "bakeoff_md" in files:
        md += ["## Bake-off", "", "Every method x every subset size against CLIP on the same layers, with the seconds a "
               f"run and a cell's choice cost on this machine: [{os.path.basename(files['bakeoff_md'])}]"
               f"({os.path.basename(files['bakeoff_md'])}).", ""]
    choices = choice_lines(tuning)
    if choices:
        md += ["## Chosen on validation, one choice per cell", "",
               "Each cell's stopping step (and, tuned, its knobs) maximises the validation metric averaged over the "
               "cell's seeds and applies to every seed; the test split took no part. Every point is in tuning.csv.",
               ""] + [f"- {line}" for line in choices] + [""]
    for key, caption in (("differences_png", "Difference against the baseline on the last layers"),
                         ("recall_png", "Retrieval vs training pairs"), ("zeroshot_png", "Zero-shot vs training pairs"),
                         ("val_curves_png", "Validation along training")):
        if key in files:
            md += [f"![{caption}]({os.path.basename(files[key])})", ""]
    md += ["Files: " + ", ".join(os.path.basename(v) for k, v in files.items() if k.endswith(("csv", "parquet")))]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def markdown_table(frame: pl.DataFrame) -> str:
    if frame.height == 0:
        return "(no runs)"
    head = "| " + " | ".join(frame.columns) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([head, sep, *body])
