"""Progress on a terminal is tqdm's live bar; anywhere else, whole lines: at most one per 10 % and one at the end,
with the stage's average rate and an ETA from it."""

from __future__ import annotations

import io
import time

import pytest

from stratalign import progress
from stratalign.progress import LogBar, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_live_bar_and_a_file_gets_lines() -> None:
    live = progress_bar(total=10, file=_Terminal(), desc="x")
    assert not isinstance(live, LogBar)
    live.close()
    logged = progress_bar(total=10, file=io.StringIO(), desc="x")
    assert isinstance(logged, LogBar)
    logged.close()
    assert progress_bar(total=3, file=io.StringIO(), disable=None).disable  # tqdm's `None`: terminals only


def test_lines_are_bounded_whole_and_end_with_a_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.0)
    out = io.StringIO()
    bar = progress_bar(total=5000, file=out, desc="train 12 runs", unit="step", mininterval=0)
    for i in range(5000):
        bar.update(1)
        if i % 50 == 0:
            bar.set_postfix_str(f"runs done {i // 500}/12")
    bar.close()
    bar.close()  # once only
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 11, lines
    assert [line.split(": ", 1)[0] for line in lines] == ["train 12 runs"] * len(lines)
    assert all("step/s" in line for line in lines)
    assert lines[0].split(": ", 1)[1].startswith("10% 500/5,000 step")
    assert lines[-1].startswith("train 12 runs: done 5,000/5,000 step") and "ETA" not in lines[-1]
    assert "runs done" in lines[-1]


def test_eta_comes_from_the_average_rate() -> None:
    out = io.StringIO()
    bar = LogBar(total=100, file=out, desc="extract", unit="row")
    bar.update(10)
    bar.start_t -= 10.0  # 10 rows in 10 s: 1 row/s on average, whatever the last update's pace
    line = bar.line()
    bar.close()
    assert "10% 10/100 row" in line and "ETA 01:30" in line and "1.00 row/s" not in line


@pytest.mark.parametrize("total", [None, 10**6])
def test_a_quiet_stage_prints_at_most_once_a_minute(monkeypatch: pytest.MonkeyPatch, total) -> None:
    out = io.StringIO()
    bar = LogBar(total=total, file=out, desc="train", unit="step", mininterval=0)
    for _ in range(2000):
        bar.update(1)
    assert out.getvalue() == ""  # well under a minute
    clock = time.monotonic() + 61
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: " + ("2,001 step" if total is None else "0% 2,001/1,000,000"))
    assert lines[1].startswith("train: done 2,001")

