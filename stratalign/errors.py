"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations


class StratalignError(Exception):
    """A user-facing error. The message is one line that names the culprit."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def preview(items: list, limit: int = 5) -> str:
    """`a, b, c (+12 more)`: the first few offending items and a count, for one-line errors."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    rest = len(items) - limit
    return f"{shown} (+{rest} more)" if rest > 0 else shown


def os_error_line(exc: OSError) -> str:
    """`<what went wrong>: <file>` for an operating-system error (full disk, permission, missing path)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else ""
    line = f"{what}: {where}" if where else what
    return " ".join(f"{type(exc).__name__}: {line}".split())


def require_int(value: object, flag: str, low: int = 0) -> int:
    """An integer >= `low` (bools refused), else a one-line error naming the flag: for counts, sizes and seeds
    checked at the boundary, before any work."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StratalignError(f"{flag} must be an integer >= {low}, got {value!r}")
    return value
