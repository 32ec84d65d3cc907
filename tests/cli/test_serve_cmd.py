"""`stratalign serve` start-up: a bad port, a port in use, an unknown run, an unknown dataset and a missing
index (--no-build) are each one line and a non-zero exit within seconds, before the server listens."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("fastapi")


def serve(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "serve", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return res, time.perf_counter() - start


def _one_line(res: subprocess.CompletedProcess, msg: str) -> None:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and msg in errors[0], res.stderr


def test_bad_port_and_port_in_use_exit_at_once(tmp_path: Path) -> None:
    res, took = serve("--run", "x", "--dataset", "d", "--port", "99999", "--store", str(tmp_path / "s"))
    _one_line(res, "--port must be between 1 and 65535 (0: any free port), got 99999")
    assert took < 5, took
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res, took = serve("--run", "x", "--dataset", "d", "--port", str(s.getsockname()[1]), "--store", str(tmp_path / "s"))
    _one_line(res, "cannot listen on 127.0.0.1")
    assert took < 5, took


def test_unknown_run_dataset_and_missing_index_are_one_line(store_with_dataset, tmp_path: Path) -> None:
    from fake_encoders import load_tiny

    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.runs.training import RunConfig, train_run

    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False),
            load=load_tiny)
    run_id = train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last",
                                        objective="clip", head="linear",
                                        options=(("max_steps", 5), ("eval_every", 5), ("dim", 8))))["run_id"]
    common = ("--store", store.url, "--port", "0", "--device", "cpu")
    res, _ = serve("--run", "nosuchrun", "--dataset", "toy", *common)
    _one_line(res, "run 'nosuchrun' is unknown")
    res, _ = serve("--run", run_id, "--dataset", "nosuchset", *common)
    _one_line(res, "nosuchset")
    res, _ = serve("--run", run_id, "--dataset", "toy", "--no-build", *common)
    _one_line(res, f"no image index of run {run_id} on dataset 'toy'")
    res, _ = serve("--run", run_id, "--dataset", "toy", "-k", "0", *common)
    _one_line(res, "-k must be between 1 and 100")
