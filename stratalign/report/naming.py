"""How reports name things, in one place: layer rules ("chosen", "last", "layers 9,4"), subset sizes (a number or
"all") and methods ("objective / layers"). Tables, sentences and plot legends all use these names."""

from __future__ import annotations

from typing import Any

from stratalign.core.stats import NO_CLEAR

CHOSEN = "chosen"  # the layer pair picked by `stratalign layers` (rule auto / best)


def rule_name(rule: Any) -> str:
    """'chosen' for the recorded layer choice (auto, best), 'last', or 'layers V,T' for an explicit pair."""
    rule = str(rule)
    if rule in ("auto", "best", CHOSEN):
        return CHOSEN
    if rule == "last":
        return "last"
    return rule if rule.startswith("layers ") else f"layers {rule}"


def n_name(n: Any) -> str:
    """A subset size: the number of pairs, or 'all' for every training pair."""
    return "all" if n is None else f"{int(n)}"


def method_label(objective: str, rule: Any) -> str:
    """'objective / layers', e.g. 'clip+structure / chosen'."""
    return f"{objective} / {rule_name(rule)}"


# after a clear verdict (or difference) that rests on a near-tie knob choice on validation (report.compare.
# with_choice_ties): report.md and bakeoff.md both mark it so
TIE_MARK = " †"


def tie_mark(comparison: dict[str, Any]) -> str:
    """TIE_MARK after a clear verdict whose method's or baseline's knobs were a near-tie (its `choice_tie`), else ''."""
    return TIE_MARK if comparison.get("choice_tie") and comparison.get("verdict") != NO_CLEAR else ""
