"""Progress bars that suit where stderr goes: tqdm's live bar on a terminal (or its notebook widget), and on a
pipe, a file or CI plain log lines, at most one per ~10 % of a stage and one when it ends, each with the overall
rate and an ETA from that rate.

Why: a live bar redraws itself with carriage returns; written to a file it became hundreds of updates per run
(a 158 s sweep wrote 590 of them, 60 KB, with a smoothed-rate ETA of four hours). Every bar of stratalign comes
from `progress_bar`, so `stratalign sweep ... > log 2>&1` gets a bounded number of readable lines.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.std import tqdm as std_tqdm

# a stage prints a line after this many seconds without one (a stage without a known total: only then), so a log
# shows a long stage is alive (its postfix says what it does) at one line a minute at most
QUIET_EVERY_S = 60.0
# no line for a step of 10 % sooner than this after the previous line (a fast stage: only its closing line)
MIN_GAP_S = 2.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogBar(std_tqdm):
    """A tqdm that writes whole lines (no carriage returns, no cursor moves): one per 10 % of the total reached,
    at least MIN_GAP_S apart, one after QUIET_EVERY_S without a line (updates keep coming, no 10 % step), and
    one at close.
    The rate is the stage's average so far (n / elapsed), so the ETA does not swing with the last few updates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._printed_tenth = 0
        self._last_line_t = time.monotonic()
        kwargs.setdefault("mininterval", 0.5)
        super().__init__(*args, **kwargs)

    def line(self, final: bool = False) -> str:
        """'desc: 40% 400/1000 step, 0:12 elapsed, 33.1 step/s, ETA 0:18, postfix' (at close: 'done' and no ETA)."""
        d = self.format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]
        unit, scale = d.get("unit") or "it", d.get("unit_scale")
        if scale and scale is not True and n:
            n, total = n * scale, (total * scale if total else total)

        def count(x: float) -> str:
            return std_tqdm.format_sizeof(x, divisor=d.get("unit_divisor") or 1000) if scale else f"{x:,.0f}"

        rate = n / elapsed if elapsed > 0 else None
        parts = []
        if total:
            parts.append(f"{'done' if final else f'{100 * n / total:.0f}%'} {count(n)}/{count(total)} {unit}")
        else:
            parts.append(f"{'done ' if final else ''}{count(n)} {unit}")
        parts.append(f"{std_tqdm.format_interval(elapsed)} elapsed")
        if rate:
            speed = count(rate) if scale or rate >= 1000 else f"{rate:.3g}"
            parts.append(f"{speed} {unit}/s" if rate >= 1 else f"{std_tqdm.format_interval(1 / rate)}/{unit}")
            if total and not final and total > n:
                parts.append(f"ETA {std_tqdm.format_interval((total - n) / rate)}")
        if d.get("postfix"):
            parts.append(str(d["postfix"]).lstrip(", "))
        desc = d.get("prefix") or ""
        return f"{desc}: " * bool(desc) + ", ".join(parts)

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last_line_t < MIN_GAP_S:
            return False
        quiet = now - self._last_line_t >= QUIET_EVERY_S  # a line now and then, so that a log never looks hung
        if self.total:
            tenth = int(10 * self.n / self.total)
            if (tenth <= self._printed_tenth or tenth >= 10) and not quiet:  # 100 % is the closing line's
                return False
            self._printed_tenth = max(self._printed_tenth, min(tenth, 9))
        elif not quiet:
            return False
        self._last_line_t = now
        return True

    def _write(self, text: str) -> None:
        try:
            self.fp.write(text + "\n")
            self.fp.flush()
        except ValueError:  # the stream was closed (interpreter shutdown)
            pass

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """tqdm calls this to redraw; a line only when one is due (never to clear: msg='')."""
        if msg is None and self._due():
            self._write(self.line())
        return True

    def moveto(self, n: int) -> None:
        """Nested bars move the cursor on a terminal; a log has no cursor."""

    def close(self) -> None:
        """The stage's closing line (count, time, average rate), once."""
        if getattr(self, "disable", True):
            return
        self.disable = True
        self._decr_instances(self)
        self._write(self.line(final=True))


def progress_bar(*args: Any, **kwargs: Any) -> std_tqdm:
    """A tqdm bar (same arguments) for stderr or `file=`: the live bar on a terminal or in a notebook, a LogBar
    elsewhere. `disable=None` keeps tqdm's meaning (off unless the stream is a terminal)."""
    stream = kwargs.get("file") or sys.stderr
    from tqdm.autonotebook import tqdm as notebook_or_std  # the notebook widget inside Jupyter, else std tqdm

    if _is_terminal(stream) or notebook_or_std is not std_tqdm:
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(*args, **kwargs)
    if kwargs.get("disable") is None and "disable" in kwargs:
        kwargs["disable"] = True
    kwargs.pop("dynamic_ncols", None)
    return LogBar(*args, **kwargs)
