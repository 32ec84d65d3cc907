"""The metric registry is the one place metric names, directions and units are spelt: every reader takes them
from it, and what it names exists."""

from __future__ import annotations

import pytest

from stratalign.core import metric_registry as reg
from stratalign.core import scoring
from stratalign.errors import StratalignError


def test_every_space_score_is_a_function_of_scoring() -> None:
    assert reg.space_scores(), "alignment_mknn is computed through the registry"
    for m in reg.space_scores():
        assert callable(getattr(scoring, m.space_score, None)), m.name


def test_the_readers_take_their_metrics_from_the_registry() -> None:
    from stratalign.cli.values import SELECT_CHOICES
    from stratalign.report import compare, report
    from stratalign.stages.runs import listing, sweep
    from stratalign.train.validation import SELECT_METRICS

    assert compare.KEY_METRICS == reg.shown_in(reg.VERDICT) == ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10",
                                                                "t2i_R@10", "zs_top1")
    assert set(report.KEY_METRICS) <= set(compare.KEY_METRICS)  # the headline the bottom line speaks of
    assert report.TABLE_METRICS == reg.shown_in(reg.TABLE)
    assert sweep.HEADLINE == reg.shown_in(reg.SWEEP) and listing.LISTED == reg.shown_in(reg.RUNS)
    assert SELECT_CHOICES == tuple(SELECT_METRICS) == ("rsum", "zeroshot", "clip_loss")
    assert SELECT_METRICS["clip_loss"] == ("clip_loss", False) and SELECT_METRICS["zeroshot"] == ("zs_top1", True)
    assert compare.QUERY_UNIT["t2i_R@1"] == "captions" and compare.QUERY_UNIT["zs_top1"] == "images"


def test_entries_describe_themselves() -> None:
    assert reg.label("i2t_R@1") == "image→text R@1 (%)" and reg.label("train_seconds") == "training time (s)"
    assert reg.metric("clip_loss").higher_is_better is False and reg.metric("best_step").higher_is_better is None
    assert reg.label("not_a_metric") == "not_a_metric"
    with pytest.raises(StratalignError, match="unknown metric 'nope'; known: rsum, i2t_R@1"):
        reg.metric("nope")
    with pytest.raises(ValueError, match="unknown places"):
        reg.Metric("x", "x", shown=("nowhere",))
