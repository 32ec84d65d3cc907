"""`stratalign sweep ... > log 2>&1`: progress in a log is a bounded number of whole lines, never a redrawn bar."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract

FAST = ["--set", "max_steps=40", "--set", "eval_every=5", "--set", "warmup_steps=5", "--set", "patience=10",
        "--set", "dim=8"]


def test_progress_in_a_log_is_a_few_lines(store_with_dataset, tmp_path: Path) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    args = ["sweep", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
            "--objective", "clip", "--objective", "clip+structure", "--objective", "csa", "--seed", "0", "--seed", "1",
            "--seed", "2", "--preset", "cpu", *FAST, "--out", str(tmp_path / "report"), "--store", store.url]
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args], capture_output=True, text=True,
                         timeout=300)  # stderr is a pipe, as in `> log 2>&1`
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b[" not in out.stderr
    progress = [line for line in out.stderr.splitlines() if not line.startswith("preset ")]
    done = [line for line in progress if ": done " in line]
    # the runs in a bar or two (heads batched, CSA fitted): at most a line per 10 % of each and its closing line
    assert 1 <= len(done) <= 2 and len(progress) <= 11 * len(done), out.stderr
    assert all(line.startswith("train ") and "step/s" in line for line in done), out.stderr
    assert re.search(r"^\d+ run\(s\) trained", out.stdout, re.M), out.stdout
