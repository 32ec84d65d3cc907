"""A dataset's zero-shot prompts: its templates and class names, set at ingest (docs/method.md § 4, "Templates").

A template holds one `{}` where the class name goes ("a photo of a {}."); a prompt per class and template goes
through the text encoder and head, and the templates of a class are averaged. Class names default to the labels;
a mapping from label to name (a wnid to "tench") renames them at ingest, so every stage (validation, evaluation,
classify, exports) sees the one name. Checked here, so a bad template is refused at ingest, not at evaluation.
"""

from __future__ import annotations

import string
from typing import Iterable, Mapping

from stratalign.errors import StratalignError, preview

EXAMPLE = '"a photo of a {}."'


def check_templates(templates: Iterable[str], where: str = "--template") -> tuple[str, ...]:
    """The templates as a tuple; refuse (one line naming the culprit) an empty list, a template without exactly
    one `{}` (or with a named or numbered field), and a repeated one (it would weigh twice in the average)."""
    out = tuple(templates)
    if not out:
        raise StratalignError(f"{where} gives no template: give at least one, e.g. {EXAMPLE}")
    for t in out:
        if not isinstance(t, str):
            raise StratalignError(f"{where}: template {t!r} is not text; give strings such as {EXAMPLE}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as exc:
            raise StratalignError(f"{where}: template {t!r} is malformed ({exc}); write it as {EXAMPLE} "
                                  "(double a literal brace: '{{')") from None
        if fields != [""]:
            raise StratalignError(f"{where}: template {t!r} must hold one '{{}}' where the class name goes "
                                  f"(found {len(fields)} field(s){': ' + preview(fields) if any(fields) else ''}), "
                                  f"e.g. {EXAMPLE}")
    repeated = sorted({t for t in out if out.count(t) > 1})
    if repeated:
        raise StratalignError(f"{where}: template(s) given twice: {preview(repeated)} (each counts once in the "
                              "average over templates; drop the repeats)")
    return out


def check_class_names(names: Mapping[str, str], labels: Iterable[str | None], where: str = "class names"
                      ) -> dict[str, str]:
    """The label -> class name mapping, refused (one line) when it names a label the dataset does not have, gives
    an empty name, or gives two labels one name (they would become one class)."""
    names = {str(k): v for k, v in names.items()}
    have = {x for x in labels if x is not None}
    unknown = sorted(set(names) - have)
    if unknown:
        raise StratalignError(f"{where} rename {len(unknown)} label(s) the dataset does not have: {preview(unknown)} "
                              f"(its labels: {preview(sorted(have))})")
    empty = sorted(k for k, v in names.items() if not isinstance(v, str) or not v.strip())
    if empty:
        raise StratalignError(f"{where} give label(s) {preview(empty)} no name (a non-empty string each)")
    final: dict[str, list[str]] = {}
    for label in sorted(have):
        final.setdefault(names.get(label, label), []).append(label)
    merged = {n: ls for n, ls in final.items() if len(ls) > 1}
    if merged:
        name, ls = next(iter(merged.items()))
        raise StratalignError(f"{where} give {len(merged)} name(s) to several labels ({name!r}: {preview(ls)}); "
                              "two labels would become one class: give each its own name")
    return names
