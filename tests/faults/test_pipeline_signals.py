"""Interrupted commands tell the truth (issue 19): Ctrl-C exits 130 and SIGTERM 143, each with one line saying
what is kept and how to resume; the loader processes end with the command, quietly; a rerun finishes the work
byte-identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.feature_store import FeatureStore

HERE = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """The CLI with the tiny encoders (tests/fault_cli.py), in its own process group like a terminal's job."""
    return subprocess.Popen([sys.executable, str(HERE / "fault_cli.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent), **(env or {})},
                            start_new_session=True, **kw)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] not in ("Z", "X"):
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_extract_exits_with_its_code_one_line_and_resumes(tmp_path: Path, store_with_dataset,
                                                                     sig, code, word) -> None:
    store, _ = store_with_dataset
    args = ("extract", "--dataset", "toy", "-e", "tiny-image", "--shard-rows", "4", "--batch-size", "2",
            "--loaders", "processes", "--store", store.url)
    proc = cli(*args, env={"TINY_DELAY_S": "0.1"})
    markers = Path(store.url).glob
    deadline = time.time() + 60
    while not list(markers("features/*/_shards/*.json")) and time.time() < deadline:
        time.sleep(0.02)
    loaders = _children(proc.pid)
    os.killpg(proc.pid, sig)  # a terminal sends Ctrl-C to the whole foreground job, loaders included
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip() and "extract tiny-image" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{word}: ") and "rerun the same `stratalign extract`" in lines[0]
    assert "Traceback" not in err
    deadline = time.time() + 10
    while any(_alive(c) for c in loaders) and time.time() < deadline:
        time.sleep(0.05)
    assert len(loaders) >= 1 and not [c for c in loaders if _alive(c)]
    done = len(list(markers("features/*/_shards/*.json")))
    assert 1 <= done < 8, "the signal should land mid-extraction"
    assert not list(markers("features/*/_claims/*.json"))  # its claims were released on the way out

    rerun = cli(*args)
    assert rerun.wait(timeout=120) == 0
    reference = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    reference.save_dataset(store.dataset("toy"))
    extract(reference, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=4, batch_size=2, progress=False),
            load=load_tiny)
    again = FeatureStore.open(store.url, "r")
    for i in range(3):
        assert (again.features("toy", "tiny-image", i).tobytes() == reference.features("toy", "tiny-image", i).tobytes())
