"""The layer rule: how a (vision, text) layer pair is picked, parsed in one place.

`train --layers` and sweeps take auto | last | V,T (V and T layer names or indices, resolved against the
feature entries later); `layers --choose` takes best | last | V,T (V and T integer indices into the layer
matrix). The rule's text form (`str(rule)`) is what run configs record as `layer_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratalign.errors import StratalignError

RUN_KEYWORDS = ("auto", "last")  # auto: the pair recorded by `layers --choose`; last: each encoder's last layer
CHOOSE_KEYWORDS = ("best", "last")  # best: the argmax of a layer-similarity metric


@dataclass(frozen=True)
class LayerRule:
    """A parsed rule: kind is one of the keywords, or "pair" with the two layers as written (stripped)."""

    kind: str
    vision: str = ""
    text: str = ""

    @classmethod
    def parse(cls, rule: str, keywords: tuple[str, ...] = RUN_KEYWORDS, flag: str = "--layers",
              indices: bool = False) -> LayerRule:
        """A keyword, or "V,T"; with indices=True V and T must be integers. Bad text -> one-line error."""
        if rule in keywords:
            return cls(rule)
        parts = rule.split(",") if isinstance(rule, str) else []
        if len(parts) == 2:
            found = cls("pair", parts[0].strip(), parts[1].strip())
            if not indices or found._ints() is not None:
                return found
        what = " (two layer indices)" if indices else ""
        raise StratalignError(f"{flag} must be {', '.join(keywords)} or V,T{what}, not {rule!r}")

    @property
    def is_pair(self) -> bool:
        return self.kind == "pair"

    def _ints(self) -> tuple[int, int] | None:
        try:
            return int(self.vision), int(self.text)
        except ValueError:
            return None

    def index_pair(self) -> tuple[int, int]:
        """The explicit pair as integer indices (as written: negative counts from the end)."""
        pair = self._ints() if self.is_pair else None
        if pair is None:
            raise StratalignError(f"layer rule {self} is not a pair of layer indices")
        return pair

    def __str__(self) -> str:
        return f"{self.vision},{self.text}" if self.is_pair else self.kind
