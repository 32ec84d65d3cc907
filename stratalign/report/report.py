"""The sweep report: a markdown summary with the table, the layer heatmap and the curves.

Wording is generated from the numbers: "helps" / "hurts" only where the paired 95 % bootstrap interval of the
difference against the baseline excludes 0 (report.compare, core.stats), "no clear difference" otherwise.
With one seed the table shows no ± (there is no spread), and says so.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

from stratalign.core.metric_registry import TABLE, VERDICT, shown_in
from stratalign.core.stats import HELPS, HURTS, NO_CLEAR

KEY_METRICS = shown_in(VERDICT)  # the registry's metrics (core.metric_registry) of the findings and of the table
TABLE_METRICS = shown_in(TABLE)  # (probe_acc: CoMM's probe on its fused features, beside one on the frozen ones)
MIN_SEEDS = 5  # METHOD.md section 4: at least 5 seeds where a report draws conclusions


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def results_table(board: pl.DataFrame, metrics: tuple[str, ...] = TABLE_METRICS) -> pl.DataFrame:
    """Compact table: one row per cell, `mean ± std` strings for the key metrics (`mean` alone for one seed),
    the majority-class rate of the test split beside the zero-shot accuracies."""
    cols = [c for c in ("layer_rule", "objective", "head", "n_pairs", "seeds") if c in board.columns]
    rows = []
    for r in board.iter_rows(named=True):
        row = {c: r[c] for c in cols}
        for m in metrics:
            if f"{m}_mean" in r:
                row[m] = _fmt(r[f"{m}_mean"], r.get(f"{m}_std"))
        if r.get("zs_majority") is not None:
            row["zs majority class"] = f"{r['zs_majority']:.1f}"
        if "lambda_at_best_mean" in r and r["lambda_at_best_mean"] is not None:
            row["restored step / λ"] = f"{r.get('best_step_mean', 0):.0f} / {r['lambda_at_best_mean']:.2f}"
        rows.append(row)
    return pl.DataFrame(rows)


def findings(comparisons: pl.DataFrame, metric: str, kind: str = "objective") -> list[str]:
    """Plain sentences, one per method: the verdict of each cell from its paired interval, and the counts."""
    if comparisons.height == 0:
        return []
    rows = comparisons.filter((pl.col("comparison") == kind) & (pl.col("metric") == metric))
    lines = []
    for method in rows["method"].unique(maintain_order=True).to_list():
        cells, counts = [], {HELPS: 0, HURTS: 0, NO_CLEAR: 0}
        for r in rows.filter(pl.col("method") == method).iter_rows(named=True):
            where = (f"{r['layer_rule']} layers" if kind == "objective" else r["objective"]) + f", n={r['n_pairs']}"
            cells.append(f"{where}: {r['diff']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}] {r['verdict']}")
            counts[r["verdict"]] += 1
        r0 = rows.filter(pl.col("method") == method).row(0, named=True)
        what = f"**{method}** vs {r0['baseline']}" if kind == "objective" else f"**{method} layers** vs {r0['baseline']}"
        lines.append(f"{what} on {metric}: helps in {counts[HELPS]} cells, hurts in {counts[HURTS]}, no clear "
                     f"difference in {counts[NO_CLEAR]}. Cells: {'; '.join(cells)}.")
    return lines


def _comparison_intro(comparisons: pl.DataFrame, seeds: int) -> list[str]:
    r = comparisons.row(0, named=True)
    text = (f"Paired differences (points of %) against the baseline run with the same layer rule, head, n_pairs "
            f"and seed, averaged over seeds, with a 95 % percentile interval from a bootstrap over the test "
            f"queries ({r['queries']} {r['query_unit']} for {r['metric']}; images for i2t and zero-shot, captions "
            f"for t2i), one resample shared by both runs of a pair and all seeds. "
            f"\"helps\" / \"hurts\" only where the interval excludes 0, otherwise \"no clear difference\".")
    if seeds < MIN_SEEDS:
        text += (f" With {seeds} seed{'s' if seeds != 1 else ''} the intervals cover the test queries, not the "
                 f"training randomness: METHOD.md asks for at least {MIN_SEEDS} seeds before drawing conclusions.")
    return [text, ""]


def _spread_note(board: pl.DataFrame) -> str:
    seeds = board["seeds"].to_list() if "seeds" in board.columns else []
    if seeds and max(seeds) == 1:
        return "One seed per cell: no ± is shown (a spread over seeds needs at least two)."
    if seeds and min(seeds) == 1:
        return "Cells with one seed show no ± (a spread over seeds needs at least two)."
    return "± is the sample standard deviation over seeds."


def tuning_lines(tuning: pl.DataFrame) -> list[str]:
    """One line per tuned objective and cell: which grid values validation chose, over how many seeds."""
    if tuning is None or tuning.height == 0:
        return []
    chosen = tuning.filter(pl.col("chosen"))
    lines = []
    for (obj, rule, n), rows in chosen.group_by(["objective", "layer_rule", "n_pairs"], maintain_order=True):
        counts = rows.group_by("knobs", maintain_order=True).len().sort("len", descending=True)
        picks = ", ".join(f"{r['knobs']} ({r['len']} seed{'s' if r['len'] != 1 else ''})" for r in counts.to_dicts())
        grid = tuning.filter((pl.col("objective") == obj) & (pl.col("layer_rule") == rule)
                             & pl.col("n_pairs").eq_missing(n) & (pl.col("seed") == rows["seed"][0]))
        lines.append(f"{obj}, {rule} layers, n={n if n is not None else 'all'}: chose {picks} "
                     f"from {grid.height} grid points by {rows['metric'][0]}")
    return lines


def write_report(out_dir: str, *, title: str, board: pl.DataFrame, layer_info: dict[str, Any] | None,
                 files: dict[str, str], extra: list[str] | None = None,
                 comparisons: pl.DataFrame | None = None, tuning: pl.DataFrame | None = None) -> str:
    """Write report.md into out_dir (PNG links are relative) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    table = results_table(board)
    md = [f"# {title}", ""]
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
    md += ["## Results (test split, mean over seeds)", "",
           "R@1 in %, zero-shot top-1 and balanced accuracy in %, beside the majority-class rate of the test split "
           "(the accuracy of always guessing the most frequent class). " + _spread_note(board) +
           " `restored step / λ`: the restored checkpoint and the STRUCTURE weight in force there (mean over seeds)."
           " CoMM is a fusion model with no retrieval space: `probe_acc` is a linear probe on the labels from its fused"
           " features, `probe_concat_acc` the same probe on the frozen features concatenated (test captions).",
           "", _markdown_table(table), ""]
    if comparisons is not None and comparisons.height:
        seeds = int(comparisons["seeds"].min())
        lines = [line for kind in ("objective", "layers") for m in KEY_METRICS for line in findings(comparisons, m, kind)]
        md += ["## What the numbers say", ""] + _comparison_intro(comparisons, seeds)
        md += [f"- {line}" for line in lines] + [""]
    tuned = tuning_lines(tuning) if tuning is not None else []
    if tuned:
        md += ["## Knobs chosen on validation", "",
               "Each tuned cell trained one run per value of its objective's grid and kept the one with the best "
               "validation value (the test split never took part); every point's value is in tuning.csv.", ""]
        md += [f"- {line}" for line in tuned] + [""]
    if "val_curves_png" in files:
        md += ["## Along training", "",
               "Validation rsum and zero-shot top-1 at every evaluation step (the run's checkpoint is the best "
               "validation value of its selection metric after any warm-up): where retrieval still rises while "
               "zero-shot falls, one stopping point trades one for the other.", "",
               f"![validation curves]({os.path.basename(files['val_curves_png'])})", ""]
    for key, caption in (("recall_png", "R@1 vs training pairs"), ("zeroshot_png", "Zero-shot accuracy vs pairs")):
        if key in files:
            md += [f"![{caption}]({os.path.basename(files[key])})", ""]
    md += ["Files: " + ", ".join(os.path.basename(v) for k, v in files.items() if k.endswith(("csv", "parquet")))]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def _markdown_table(frame: pl.DataFrame) -> str:
    if frame.height == 0:
        return "(no runs)"
    head = "| " + " | ".join(frame.columns) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([head, sep, *body])
