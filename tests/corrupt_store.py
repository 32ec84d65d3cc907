"""The store the fault suite damages: dataset 'toy' (30 images, 60 captions), both tiny encoders extracted in shards
of 8 rows, layers chosen, one short run, a prompt cache (built once per module); `store_copy` is a fresh copy."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

SHARD_ROWS = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store with dataset 'toy', both tiny encoders extracted, layers chosen, one short run, a prompt cache."""
    from conftest import coco_toy_store

    from stratalign.stages.layers import LayersConfig, run_layers
    from stratalign.stages.runs.config import RunConfig
    from stratalign.stages.runs.training import train_run
    from stratalign.store import prompt_cache

    base = tmp_path_factory.mktemp("corrupt")
    store = coco_toy_store(base, SHARD_ROWS)
    run_layers(store, LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", n=20))
    train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="auto",
                               objective="clip+structure-knn",
                               options=(("max_steps", 20), ("batch_size", 16), ("dim", 8), ("eval_every", 5),
                                        ("warmup_steps", 5), ("knn_k", 3))))
    prompt_cache.save(store, "toy-prompts", [np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)],
                      ["a", "b", "c"])
    return base / "store"


@pytest.fixture
def store_copy(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "store", symlinks=True)
    return tmp_path / "store"


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `stratalign ARGS` run in-process (the fault tests' view of the CLI)."""
    from stratalign.cli.main import main

    monkeypatch.setattr(sys, "argv", ["stratalign", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err
