"""THE metric registry: one declaration per metric a run records (its name in metrics.json, direction, unit,
display name, where it is shown), read by reports, leaderboards, comparisons, `runs ls`, the CLI and checkpoint
selection. Adding a metric is one `Metric` here and the function that computes it (docs/extending/metric.md).

Pure data, no imports beyond the standard library: the CLI reads it for `--help` without loading numpy or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratalign.errors import StratalignError

# where a metric is shown (Metric.shown)
VERDICT = "verdict"  # paired comparisons against the baseline and the report's findings (report.compare / report)
TABLE = "table"  # the report's results table (report.report)
SWEEP = "sweep"  # a sweep's runs table and leaderboard (stages.runs.sweep)
RUNS = "runs"  # a column of `stratalign runs ls` (stages.runs.listing)
RUN = "run"  # the line `stratalign train` / `eval` print for one run (cli.common)
PLACES = (VERDICT, TABLE, SWEEP, RUNS, RUN)

TEST, VALIDATION, TRAINING = "test", "validation", "training"  # Metric.split: what a value is measured on


@dataclass(frozen=True)
class Metric:
    """One recorded metric.

    name: its key in metrics.json, leaderboards and per-query results. display: how a person reads it.
    unit: "%" (scores in percent), "steps", "s", "" (a plain number). higher_is_better: the direction (None: a
    fact about training, not a score). split: test | validation | training. shown: the PLACES it appears in.
    query_unit: what one per-query result is (images | captions) where comparisons bootstrap over queries.
    select: its `--select` name where it can pick the restored checkpoint (docs/method.md § 3.8); validation_key: its key
    in a run's validation curve when that differs from `name`.
    space_score: the name of a function of core.scoring that computes it from a test split's learned space
    (`scoring.Space`), called by the retrieval scorer (stages.runs.evaluate) for every metric that names one."""

    name: str
    display: str
    unit: str = "%"
    higher_is_better: bool | None = True
    split: str = TEST
    shown: tuple[str, ...] = ()
    query_unit: str | None = None
    select: str | None = None
    space_score: str | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.shown if p not in PLACES]
        if unknown:
            raise ValueError(f"metric {self.name}: unknown places {unknown}; known: {PLACES}")


_ALL = (VERDICT, TABLE, SWEEP, RUNS, RUN)
REGISTRY: tuple[Metric, ...] = (
    # validation yardsticks of checkpoint selection (train.validation); rsum is the first --select choice
    Metric("rsum", "validation rsum (R@1+R@5+R@10, both ways)", unit="", split=VALIDATION, select="rsum"),
    # test metrics (stages.runs.evaluate), in the order tables show them
    Metric("i2t_R@1", "image→text R@1", shown=_ALL, query_unit="images"),
    Metric("t2i_R@1", "text→image R@1", shown=_ALL, query_unit="captions"),
    Metric("i2t_R@5", "image→text R@5", shown=(VERDICT, TABLE, SWEEP, RUN), query_unit="images"),
    Metric("t2i_R@5", "text→image R@5", shown=(VERDICT, TABLE, SWEEP, RUN), query_unit="captions"),
    Metric("i2t_R@10", "image→text R@10", shown=(VERDICT, TABLE, SWEEP, RUN), query_unit="images"),
    Metric("t2i_R@10", "text→image R@10", shown=(VERDICT, TABLE, SWEEP, RUN), query_unit="captions"),
    Metric("zs_top1", "zero-shot top-1", shown=_ALL, query_unit="images", select="zeroshot"),
    Metric("zs_top5", "zero-shot top-5", shown=(SWEEP, RUN), query_unit="images"),
    Metric("zs_balanced_acc", "zero-shot balanced accuracy", shown=(TABLE, SWEEP, RUN)),
    Metric("alignment_mknn", "mutual-kNN alignment of the learned spaces", shown=(SWEEP, RUN),
           space_score="alignment_of_space"),
    Metric("probe_acc", "linear probe on the fused features (CoMM)", shown=(TABLE, SWEEP, RUN)),
    Metric("probe_f1_macro", "linear probe macro F1 (CoMM)", shown=(RUN,)),
    Metric("probe_concat_acc", "linear probe on the frozen features, concatenated", shown=(TABLE, SWEEP)),
    Metric("clip_loss", "validation CLIP loss", unit="", higher_is_better=False, split=VALIDATION,
           select="clip_loss"),
    # facts about training, shown beside the scores
    Metric("best_step", "restored step", unit="steps", higher_is_better=None, split=TRAINING, shown=(SWEEP, RUN)),
    Metric("lambda_at_best", "λ at the restored step", unit="", higher_is_better=None, split=TRAINING,
           shown=(SWEEP, RUN)),
    Metric("stopped_reason", "why training stopped", unit="", higher_is_better=None, split=TRAINING, shown=(RUN,)),
    Metric("train_seconds", "training time", unit="s", higher_is_better=None, split=TRAINING, shown=(SWEEP,)),
)
METRICS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
_BY_NAME = {m.name: m for m in REGISTRY}
if len(_BY_NAME) != len(REGISTRY):
    raise ValueError("two metrics of the registry share a name")


def metric(name: str) -> Metric:
    """The registry entry of a metric, or one error listing the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise StratalignError(f"unknown metric {name!r}; known: {', '.join(_BY_NAME)}") from None


def shown_in(place: str) -> tuple[str, ...]:
    """The names of the metrics shown in a place (one of PLACES), in registry order."""
    if place not in PLACES:
        raise StratalignError(f"unknown place {place!r}; known: {', '.join(PLACES)}")
    return tuple(m.name for m in REGISTRY if place in m.shown)


def select_metrics() -> dict[str, tuple[str, bool]]:
    """--select name -> (the validation curve's key, True when higher is better), in registry order."""
    return {m.select: (m.name, bool(m.higher_is_better)) for m in REGISTRY if m.select}


def query_units() -> dict[str, str]:
    """Metric name -> what one of its per-query results is (images | captions)."""
    return {m.name: m.query_unit for m in REGISTRY if m.query_unit}


def space_scores() -> tuple[Metric, ...]:
    """The metrics computed from a test split's learned space by a function of core.scoring."""
    return tuple(m for m in REGISTRY if m.space_score)


def label(name: str) -> str:
    """'image→text R@1 (%)': a metric's display name with its unit (the name itself for an unknown key)."""
    m = _BY_NAME.get(name)
    if m is None:
        return name
    return f"{m.display} ({m.unit})" if m.unit else m.display
