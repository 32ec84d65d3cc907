"""Does the layer ranking predict what training gets? (issue 28, "does the choice matter")

A few candidate layer pairs, spread over the calibrated ranking of `layers` (best to worst, the last-layer pair
always among them), each get a short CLIP run (linear heads, every training pair, the given seeds); the check is
the Spearman rank correlation, over the candidates, between the pair's similarity score (calibrated: raw minus
the permutation null's mean, docs/method.md § 2; and raw) and the runs' validation rsum at their restored step
(the selection value; the test split takes no part). A correlation near 1 says the ranking orders pairs the way
training does; near 0, that the choice by similarity is no better than any pair. Spread over every pair, the
candidates include near-useless layers (an embedding layer) that alone make rho high; `span` spreads them over the
top ranks only, which asks whether the ranking orders the contenders. With 5 candidates a rank correlation has a
coarse null (exact permutation p = 2/120 = 0.017 at best, two-sided, for rho = +-1), so the check states rho with
its p-value and the table of candidates rather than a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stratalign.core.stats import spearman
from stratalign.errors import StratalignError
from stratalign.stages.layers import calibration_of
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.training import train_runs
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

CANDIDATES = 5


@dataclass(frozen=True)
class CandidateCheck:
    """The candidates (vision layer, text layer, raw score, calibrated score, mean validation rsum, run ids) and
    the rank correlations of the raw and calibrated scores with the validation rsum."""

    metric: str
    seeds: tuple[int, ...]
    span: int  # the candidates were spread over the top `span` ranks of the pairs
    rows: tuple[dict[str, Any], ...]
    rho_calibrated: float | None
    p_calibrated: float | None
    rho_raw: float
    p_raw: float

    def lines(self) -> list[str]:
        """What the check found, in two sentences and one line per candidate."""
        cal = "" if self.rho_calibrated is None else (
            f"calibrated {self.metric}: Spearman rho {self.rho_calibrated:+.2f} (p = {self.p_calibrated:.3f}); ")
        out = [f"Layer ranking against training: over {len(self.rows)} candidate pairs spread over the top "
               f"{self.span} of the ranking (and the last pair), each "
               f"trained with CLIP (seeds {list(self.seeds)}, all training pairs), the rank correlation of the "
               f"similarity score with the validation rsum is {cal}raw {self.metric}: rho {self.rho_raw:+.2f} "
               f"(p = {self.p_raw:.3f})."]
        for r in self.rows:
            cal_s = "" if r["calibrated"] is None else f", calibrated {r['calibrated']:.3f}"
            out.append(f"pair ({r['vision_layer']},{r['text_layer']}): {self.metric} {r['raw']:.3f}{cal_s}; "
                       f"validation rsum {r['val_rsum']:.1f}")
        return out


def candidate_pairs(result: dict[str, Any], metric: str, count: int = CANDIDATES,
                    span: int | None = None) -> list[tuple[int, int]]:
    """`count` pairs at evenly spaced ranks of the calibrated scores (raw where there is no calibration), best
    first, among the top `span` ranks (None: every pair: a spread that includes near-useless layers, which then
    drive the correlation; a span of the top pairs asks whether the ranking orders the contenders), and the
    last-layer pair if it is not among them."""
    if count < 2:
        raise StratalignError(f"the layer check needs at least 2 candidate pairs, not {count}")
    cal = calibration_of(result, metric)
    mat = np.asarray(result["matrices"][metric] if cal is None else cal["calibrated"], dtype=np.float64)
    order = np.argsort(-mat, axis=None, kind="stable")
    top = len(order) if span is None else max(2, min(int(span), len(order)))
    ranks = np.unique(np.linspace(0, top - 1, min(count, top)).round().astype(int))
    pairs = [(int(order[i] // mat.shape[1]), int(order[i] % mat.shape[1])) for i in ranks]
    last = (mat.shape[0] - 1, mat.shape[1] - 1)
    return pairs if last in pairs else pairs + [last]


def check_candidates(store: FeatureStore, result: dict[str, Any], base: RunConfig, *, metric: str = "mutual_knn",
                     count: int = CANDIDATES, seeds: tuple[int, ...] = (0,), span: int | None = None,
                     progress: bool = False) -> CandidateCheck:
    """Train a CLIP run per candidate pair and seed (`base` gives the dataset, encoders and trainer settings) and
    correlate the layer scores of `result` (a `layers` result) with the validation rsum."""
    if metric not in result["matrices"]:
        raise StratalignError(f"metric {metric!r} was not computed; computed: {list(result['matrices'])}")
    pairs = candidate_pairs(result, metric, count, span)
    configs = [replace(base, layers=f"{v},{t}", objective="clip", head="linear", n_pairs=None, seed=s)
               for v, t in pairs for s in seeds]
    done = train_runs(store, configs, progress=progress)
    registry = RunRegistry(store)
    raw = np.asarray(result["matrices"][metric], dtype=np.float64)
    cal = calibration_of(result, metric)
    rows = []
    for i, (v, t) in enumerate(pairs):
        ids = [done[i * len(seeds) + j]["run_id"] for j in range(len(seeds))]
        values = [_val_rsum(registry.metrics(rid)) for rid in ids]
        rows.append({"vision_layer": v, "text_layer": t, "raw": float(raw[v, t]),
                     "calibrated": None if cal is None else float(np.asarray(cal["calibrated"])[v, t]),
                     "val_rsum": float(np.mean(values)), "runs": ids})
    val = [r["val_rsum"] for r in rows]
    rho_raw, p_raw = spearman([r["raw"] for r in rows], val)
    rho_cal, p_cal = spearman([r["calibrated"] for r in rows], val) if cal is not None else (None, None)
    ranked = raw.size
    return CandidateCheck(metric, tuple(seeds), ranked if span is None else min(max(2, int(span)), ranked), tuple(rows),
                          None if rho_cal is None else float(rho_cal),
                          None if p_cal is None else float(p_cal), float(rho_raw), float(p_raw))


def _val_rsum(metrics: dict[str, Any]) -> float:
    """The validation rsum of a run at its restored step (from its validation curve)."""
    step = metrics.get("best_step")
    for row in metrics.get("val_curve") or []:
        if isinstance(row, dict) and row.get("step") == step and row.get("rsum") is not None:
            return float(row["rsum"])
    raise StratalignError(f"run {metrics.get('run_id')} has no validation rsum at its restored step {step}")
