"""The sweep report: a markdown summary with the table, the layer heatmap and the curves.

Wording is generated from the numbers: an objective "helps" only where its mean beats the CLIP baseline of
the same cell by more than the seeds' spread, and the report says so where it does not.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

KEY_METRICS = ("i2t_R@1", "t2i_R@1", "zs_top1")


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def results_table(board: pl.DataFrame, metrics: tuple[str, ...] = KEY_METRICS) -> pl.DataFrame:
    """Compact table: one row per cell, `mean ± std` strings for the key metrics."""
    cols = [c for c in ("layer_rule", "objective", "head", "n_pairs", "seeds") if c in board.columns]
    rows = []
    for r in board.iter_rows(named=True):
        row = {c: r[c] for c in cols}
        for m in metrics:
            if f"{m}_mean" in r:
                row[m] = _fmt(r[f"{m}_mean"], r.get(f"{m}_std"))
        if "lambda_at_best_mean" in r and r["lambda_at_best_mean"] is not None:
            row["restored step / λ"] = f"{r.get('best_step_mean', 0):.0f} / {r['lambda_at_best_mean']:.2f}"
        rows.append(row)
    return pl.DataFrame(rows)


def findings(board: pl.DataFrame, baseline: str = "clip", metric: str = "i2t_R@1") -> list[str]:
    """Plain sentences comparing each objective with the baseline, cell by cell."""
    lines = []
    mean, std = f"{metric}_mean", f"{metric}_std"
    if mean not in board.columns:
        return lines
    base = board.filter(pl.col("objective") == baseline)
    for obj in [o for o in board["objective"].unique(maintain_order=True).to_list() if o != baseline]:
        wins, ties, losses = [], [], []
        for r in board.filter(pl.col("objective") == obj).iter_rows(named=True):
            b = base.filter((pl.col("layer_rule") == r["layer_rule"]) & (pl.col("n_pairs") == r["n_pairs"]))
            if b.height == 0 or r[mean] is None:
                continue
            b = b.row(0, named=True)
            diff = r[mean] - b[mean]
            spread = max(r[std] or 0.0, b[std] or 0.0)
            cell = f"{r['layer_rule']} layers, n={r['n_pairs']}: {diff:+.1f}"
            (wins if diff > spread else losses if diff < -spread else ties).append(cell)
        verdict = ("helps" if len(wins) > len(losses) + len(ties) else
                   "hurts" if len(losses) > len(wins) + len(ties) else "does not clearly help")
        lines.append(f"**{obj}** vs {baseline} on {metric}: {verdict} "
                     f"(better beyond the seed spread in {len(wins)} cells, within it in {len(ties)}, "
                     f"worse in {len(losses)}). Cells: {'; '.join(wins + ties + losses)}.")
    return lines


def layer_rule_finding(board: pl.DataFrame, metric: str, margin: float = 1.0) -> str | None:
    """Chosen ('auto') vs last layers on one metric, averaged over the cells both rules share."""
    mean = f"{metric}_mean"
    rules = board["layer_rule"].unique().to_list() if "layer_rule" in board.columns else []
    if mean not in board.columns or "auto" not in rules or "last" not in rules:
        return None
    a = board.filter(pl.col("layer_rule") == "auto")[mean].mean()
    last = board.filter(pl.col("layer_rule") == "last")[mean].mean()
    verdict = ("no clear difference" if abs(a - last) < margin else
               "chosen layers better" if a > last else "last layers better")
    return f"Chosen vs last layers, {metric} averaged over all cells: {a:.1f} vs {last:.1f} ({verdict})."


def write_report(out_dir: str, *, title: str, board: pl.DataFrame, layer_info: dict[str, Any] | None,
                 files: dict[str, str], extra: list[str] | None = None) -> str:
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
    md += ["## Results (test split, mean ± std over seeds)", "",
           "R@1 in %, zero-shot top-1 in %. `restored step / λ`: the early-stopping checkpoint and the "
           "STRUCTURE weight in force there (mean over seeds).", "", _markdown_table(table), ""]
    lines = [line for m in KEY_METRICS for line in findings(board, metric=m)]
    lines += [x for x in (layer_rule_finding(board, m) for m in KEY_METRICS) if x]
    if lines:
        md += ["## What the numbers say", ""] + [f"- {line}" for line in lines] + [""]
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
