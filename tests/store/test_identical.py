"""Byte-identical images are joined into one group, whatever their row order and named groups."""

from __future__ import annotations

import polars as pl

from stratalign.store.identical import join_identical


def _frame(rows: list[tuple[str, str, str | None, str | None]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"image_id": pl.String, "sha": pl.String, "split": pl.String,
                                      "group": pl.String}, orient="row")


def test_no_twins_keeps_every_key_and_group() -> None:
    out = join_identical(_frame([("a", "1", None, None), ("b", "2", "test", "g"), ("c", "3", None, "g")]))
    assert out.split_keys == ["a", "group:g", "group:g"] and out.groups == [None, "g", "g"]
    assert out.splits == [None, "test", None] and out.report == {}


def test_twins_join_their_groups_order_free() -> None:
    rows = [("b", "x", None, None), ("a", "x", None, None), ("c", "y", None, "g"), ("d", "y", None, None),
            ("e", "z", None, "g"), ("f", "w", None, None)]
    out = join_identical(_frame(rows))
    assert out.split_keys == ["a", "a", "d", "d", "d", "f"]  # the smallest key of a joined set ("d" < "group:g")
    assert out.groups == ["a", "a", "d", "d", "d", None]  # a named group joined by a twin moves whole (e)
    assert out.report == {"images": 4, "sets": 2, "across_given_splits": 0}
    again = join_identical(_frame(rows[::-1]))
    assert again.split_keys == out.split_keys[::-1] and again.groups == out.groups[::-1]


def test_given_splits_are_kept_counted_and_lent_to_twins() -> None:
    out = join_identical(_frame([("a", "x", "train", None), ("b", "x", "test", None),
                                 ("c", "y", "val", None), ("d", "y", None, None)]))
    assert out.splits == ["train", "test", "val", "val"]  # a twin without a split follows the given one
    assert out.report == {"images": 4, "sets": 2, "across_given_splits": 1}
