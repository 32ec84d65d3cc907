"""Byte-identical images of one dataset kept in one split (docs/method.md § 4, "Overlap").

Two image files with the same content hash are the same image under two names: if one lands in train and the
other in test, the test split scores an image the heads trained on. At ingest such images are joined into one
group, together with any group they already belong to (a named group is joined whole), and a drawn split is
drawn once per joined group. A split given by the source is kept as it is, but the images it puts in several
splits are counted, so the ingest report can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass(frozen=True)
class IdenticalImages:
    """The joined groups of one dataset's images: per image row, the key a drawn split is drawn from and the group
    it is kept with (None for an image that is in no group), and what the ingest report says about them."""

    split_keys: list[str]
    groups: list[str | None]
    splits: list[str | None]  # the given split, or the one given to an identical twin (None: to be drawn)
    report: dict[str, int] = field(default_factory=dict)  # empty when no two images share their bytes


def _find(parent: dict[str, str], key: str) -> str:
    root = key
    while parent[root] != root:
        root = parent[root]
    while parent[key] != root:  # path compression
        parent[key], key = root, parent[key]
    return root


def join_identical(images: pl.DataFrame) -> IdenticalImages:
    """Join the images of `images` (image_id, sha, split, group) that share a content hash into one group.

    An image's own key is its group ("group:<name>") or, without one, its image id; images that share a hash join
    their keys, and a joined set is represented by its smallest key, so the result does not depend on row order
    and an image with no identical twin keeps the key (hence the drawn split) it had before."""
    ids, shas = images["image_id"].to_list(), images["sha"].to_list()
    named, given = images["group"].to_list(), images["split"].to_list()
    keys = [i if g is None else f"group:{g}" for i, g in zip(ids, named)]
    parent = {k: k for k in keys}
    first_of: dict[str, str] = {}
    twins: set[str] = set()
    for key, sha in zip(keys, shas):
        if sha in first_of:
            twins.add(sha)
            a, b = _find(parent, first_of[sha]), _find(parent, key)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_of[sha] = key
    if not twins:
        return IdenticalImages(keys, list(named), list(given))
    roots = [_find(parent, k) for k in keys]
    joined = {r for k, r in zip(keys, roots) if k != r}  # sets that gained a key by a shared hash
    groups = [(r.removeprefix("group:") if r.startswith("group:") else r) if r in joined else g
              for r, g in zip(roots, named)]
    splits_of: dict[str, set[str]] = {}
    for r, s in zip(roots, given):
        if r in joined and s is not None:
            splits_of.setdefault(r, set()).add(s)
    only = {r: next(iter(s)) for r, s in splits_of.items() if len(s) == 1}
    splits = [s if s is not None else only.get(r) for r, s in zip(roots, given)]
    report = {"images": sum(sha in twins for sha in shas), "sets": len(twins),
              "across_given_splits": sum(len(s) > 1 for s in splits_of.values())}
    return IdenticalImages(roots, groups, splits, report)
