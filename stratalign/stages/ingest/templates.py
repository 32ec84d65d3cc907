"""Zero-shot templates and class names for `ingest --template` / `--templates-file` (checked by store.zero_shot).

A templates file is either text, one template per line (blank lines and lines starting with '#' are skipped),
or JSON: a list of templates, or an object {"templates": [...], "class_names": {label: name}}.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import fsspec

from stratalign.errors import StratalignError

ZeroShot = tuple[tuple[str, ...] | None, dict[str, str] | None]  # (templates, class names)


def _from_json(data: Any, path: str) -> ZeroShot:
    if isinstance(data, list):
        return tuple(data), None
    if not isinstance(data, dict) or not set(data) <= {"templates", "class_names"} or not data:
        raise StratalignError(f"templates file {path}: JSON must be a list of templates or an object with "
                              "'templates' (a list) and/or 'class_names' ({label: name})")
    templates, names = data.get("templates"), data.get("class_names")
    if templates is not None and not isinstance(templates, list):
        raise StratalignError(f"templates file {path}: 'templates' must be a list of strings")
    if names is not None and not isinstance(names, dict):
        raise StratalignError(f"templates file {path}: 'class_names' must be an object {{label: name}}")
    return (tuple(templates) if templates is not None else None), names


def read_templates_file(path: str) -> ZeroShot:
    """(templates, class names) of a templates file (either may be None)."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read().decode("utf-8")
    except FileNotFoundError:
        raise StratalignError(f"templates file not found: {path}") from None
    except UnicodeDecodeError:
        raise StratalignError(f"templates file {path} is not UTF-8 text") from None
    if path.lower().endswith(".json"):
        try:
            return _from_json(json.loads(raw), path)
        except json.JSONDecodeError as exc:
            raise StratalignError(f"templates file {path} is not valid JSON: {exc}") from None
    lines = [line.strip() for line in raw.splitlines()]
    return tuple(line for line in lines if line and not line.startswith("#")), None


def zero_shot_args(templates: Sequence[str] | None, templates_file: str | None) -> ZeroShot:
    """(templates, class names) from `--template` (repeatable) and `--templates-file`; templates from both is an
    error (which would win?)."""
    from_file, names = read_templates_file(templates_file) if templates_file else (None, None)
    if templates and from_file is not None:
        raise StratalignError(f"templates given by --template and in --templates-file {templates_file}: "
                              "give them in one place")
    return (tuple(templates) if templates else from_file), names
