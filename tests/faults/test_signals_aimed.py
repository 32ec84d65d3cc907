"""SIGINT and SIGTERM aimed at the moments that hung or spoke wrongly (issue 29): while `extract` forks its loader
processes, mid-work, and while a command is already exiting, for extract, train, sweep and ingest. Every trial must
end within 10 s of the signal, with the signal's code (130 / 143), exactly one "interrupted:"/"terminated:" line and
no traceback or "Exception ignored". The default suite aims one SIGTERM at the loader start; the slow one runs
>= 50 trials over commands x moments x signals and prints the fault table."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
END_S = 10.0  # the promise: a signalled command ends within this


def _start(args: list[str], marks: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "fault_cli.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent), "FAULT_MARKS": str(marks), **(env or {})})


def _wait_mark(proc: subprocess.Popen, marks: Path, mark: str, timeout: float = 90.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if marks.exists() and mark in marks.read_text().split():
            return True
        time.sleep(0.002)
    return False


def _commands(base: Path, trial: Path) -> dict[str, list[str]]:
    store = str(trial / "store")
    return {
        "extract": ["extract", "--dataset", "toy", "-e", "tiny-image", "--shard-rows", "4", "--batch-size", "2",
                    "--loaders", "processes", "--store", store],
        "train": ["train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--objective", "clip",
                  "--set", "max_steps=40", "--set", "batch_size=8", "--set", "eval_every=5", "--seed", "9",
                  "--store", store],
        "sweep": ["sweep", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--seed", "7",
                  "--objective", "clip", "--layers", "last", "--set", "max_steps=40", "--set", "batch_size=8",
                  "--out", str(trial / "report"), "--store", store],
        "ingest": ["ingest", "coco", "--captions", str(base / "coco.json"), "--images", str(base / "imgs"),
                   "--name", "again", "--store", store],
    }


def trial(base: Path, pristine: Path, root: Path, command: str, moment: str, sig: int, rng: random.Random) -> str:
    """One aimed signal; '' when the command ended as promised, else what went wrong."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(pristine, root / "store", symlinks=True)
    if command == "extract":  # a fresh extraction: forks its loaders, then encodes
        for entry in (root / "store" / "features").iterdir():
            if "tiny-image" in entry.name:
                shutil.rmtree(entry)
        shutil.rmtree(root / "store" / "extract_records", ignore_errors=True)
    marks = root / "marks"
    env = {"TINY_DELAY_S": "0.05", "FAULT_EXIT_DELAY_S": "2" if moment == "exit" else "0"}
    proc = _start(_commands(base, root)[command], marks, env)
    try:
        if moment == "loaders":
            if not _wait_mark(proc, marks, "loaders"):
                return f"never reached the loader start (exit {proc.poll()})"
            time.sleep(rng.uniform(0, 0.08))
        elif moment == "exit":
            if not _wait_mark(proc, marks, "exiting"):
                return f"never reached its exit (exit {proc.poll()})"
            time.sleep(rng.uniform(0, 0.5))
        else:  # mid-work: any moment from the CLI's first line of Python on (its imports take seconds here)
            if not _wait_mark(proc, marks, "started"):
                return f"never started (exit {proc.poll()})"
            time.sleep(rng.uniform(0.0, 4.0))
        if proc.poll() is not None:
            return "skip"  # finished before the signal: not a trial
        os.killpg(proc.pid, sig)  # as a terminal sends it: the whole job, loaders included
        t0 = time.time()
        try:
            _, err = proc.communicate(timeout=END_S)
        except subprocess.TimeoutExpired:
            return f"hung: still running {END_S:g} s after the signal"
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    want = 130 if sig == signal.SIGINT else 143
    word = "interrupted:" if sig == signal.SIGINT else "terminated:"
    said = [line for line in err.splitlines() if line.startswith(("interrupted:", "terminated:"))]
    if "Traceback" in err or "Exception ignored" in err:
        return f"printed a traceback: {err[-300:]!r}"
    if proc.returncode != want:
        return f"exit {proc.returncode}, not {want} ({took:.1f} s): {err[-200:]!r}"
    if len(said) != 1 or not said[0].startswith(word):
        return f"said {said!r}, not one {word!r} line"
    return ""


@pytest.fixture(scope="module")
def base(pristine: Path) -> Path:
    return pristine.parent


def test_a_signal_at_the_loader_start_ends_extract_in_one_line(base: Path, pristine: Path, tmp_path: Path) -> None:
    assert trial(base, pristine, tmp_path / "t", "extract", "loaders", signal.SIGTERM, random.Random(1)) == ""


@pytest.mark.slow
def test_a_signal_while_train_exits_ends_it_in_one_line(base: Path, pristine: Path, tmp_path: Path) -> None:
    """Was: exit -15 and nothing said."""
    got = trial(base, pristine, tmp_path / "t", "train", "exit", signal.SIGTERM, random.Random(3))
    assert got == ""


@pytest.mark.slow
def test_aimed_signals_never_hang_nor_print_a_traceback(base: Path, pristine: Path, tmp_path: Path) -> None:
    rng = random.Random(29)
    plan = [(c, m, s) for c in ("extract", "train", "sweep", "ingest") for m in ("loaders", "work", "exit")
            for s in (signal.SIGINT, signal.SIGTERM) if c == "extract" or m != "loaders"]
    plan = [("extract", "loaders", s) for s in (signal.SIGINT, signal.SIGTERM) for _ in range(12)] + plan * 2
    results: Counter = Counter()
    failures = []
    for i, (command, moment, sig) in enumerate(plan):
        got = trial(base, pristine, tmp_path / f"t{i % 2}", command, moment, sig, rng)
        kind = f"{command}@{moment}/{signal.Signals(sig).name}"
        results[kind, "skipped" if got == "skip" else "trials"] += 1
        if got and got != "skip":
            failures.append(f"{kind}: {got}")
    trials = sum(n for (_, what), n in results.items() if what == "trials")
    kinds = {k for k, what in results if what == "trials"}
    print(f"\nfault table: aimed signals: {trials} trials, {len(kinds)} kinds (command@moment/signal), "
          f"{len(failures)} failures")
    print(json.dumps({k: results[k, "trials"] for k in sorted(kinds)}))
    for line in failures:
        print("failure:", line)
    assert not failures, failures
    assert trials >= 50
