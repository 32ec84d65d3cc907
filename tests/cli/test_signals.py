"""SIGINT/SIGTERM always end a command (issue 29): the watchdog ends a process whose unwinding hangs or swallows the
interrupt, a second signal ends it at once, and a signal while it exits ends it with the line and its code (it
gave -15 / -2 and said nothing). Each case runs a few lines of Python in a child process (no torch: ~1-6 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _child(body: str) -> subprocess.Popen:
    code = textwrap.dedent('''
        import os, signal, sys, time
        sys.argv = ["stratalign", "train", "--dataset", "toy"]
        from stratalign.cli import signals
        signals.install()
    ''') + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _signal_when_ready(proc: subprocess.Popen, sig: int, times: int = 1) -> tuple[int, str, float]:
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err, time.time() - t0


def test_a_swallowed_interrupt_still_ends_the_process_within_the_grace() -> None:
    proc = _child('''
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(60)  # an unwinding that never ends (a join on a dead loader, a swallowed interrupt)
    ''')
    code, err, took = _signal_when_ready(proc, signal.SIGTERM)
    assert code == 143 and took < 10 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("terminated: ") and "stratalign train" in err


def test_a_second_signal_ends_it_at_once() -> None:
    proc = _child('''
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(60)
    ''')
    code, err, took = _signal_when_ready(proc, signal.SIGINT, times=2)
    assert code == 130 and took < 3 and err.startswith("interrupted: ") and len(err.strip().splitlines()) == 1


def test_a_signal_while_exiting_ends_it_with_the_line() -> None:
    proc = _child('''
        import atexit
        atexit.register(lambda: time.sleep(60))  # a shutdown that takes its time
        signals.exiting()
        print("ready", flush=True)
    ''')
    code, err, took = _signal_when_ready(proc, signal.SIGTERM)
    assert code == 143 and took < 3 and err.startswith("terminated: ") and "Traceback" not in err
