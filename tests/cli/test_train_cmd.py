"""`stratalign train`: the head an objective needs is picked as `sweep` picks it; the test metrics name the test split
and its size."""

from __future__ import annotations

import subprocess
import sys

from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.runs import RunRegistry


def test_csa_trains_with_its_own_head_without_being_told(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "train", "--dataset", "toy", "--vision",
                          "tiny-image", "--text", "tiny-text", "--layers", "last", "--objective", "csa", "--set", "dim=4",
                          "--store", store.url], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [rid] = RunRegistry(store).ids()
    assert RunRegistry(store).config(rid)["head"] == "csa" and f"run {rid}" in out.stdout
    ds = store.dataset("toy")
    lines = out.stdout.splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("test metrics:"))
    assert lines[note] == (f"test metrics: the dataset's test split ({len(ds.image_rows('test'))} images, "
                           f"{len(ds.pairs('test')[1])} captions)")
    assert lines[note - 1].startswith("validation:") and "R@1=" in lines[note + 1]  # the metrics follow it
