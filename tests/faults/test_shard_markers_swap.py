"""A shard file copied over another shard of the same layer (issue 29): every chunk is whole, so the per-chunk crc32c
passes; the read must still refuse, since the chunks are not the ones the shard's marker names. `train` and `eval`
refuse in one line instead of answering from the wrong rows; `store verify` names it; `store repair` re-encodes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from corrupt_store import run_cli

from stratalign.errors import StratalignError
from stratalign.store.feature_store import FeatureStore


def _image_entry(root: Path) -> Path:
    return next(p for p in (root / "features").iterdir() if "tiny-image" in p.name)


def _swap(root: Path, layer: int = 1, src: int = 1, dst: int = 2) -> None:
    folder = _image_entry(root) / f"layer_{layer:03d}" / "c"
    shutil.copyfile(folder / str(src) / "0", folder / str(dst) / "0")


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    return code, err


def test_a_swapped_shard_is_refused_by_reads_of_any_row_of_it(store_copy: Path) -> None:
    key = _image_entry(store_copy).name
    good = FeatureStore.open(str(store_copy), "r").entry(key).read_layer(1)
    _swap(store_copy)
    entry = FeatureStore.open(str(store_copy), "r").entry(key)
    np.testing.assert_array_equal(entry.read_layer(1, np.arange(0, 16)), good[:16])  # other shards still read
    for rows in (np.array([16]), np.array([23, 3]), None):
        with pytest.raises(StratalignError, match=r"shard 2: inner chunk [01] is not the one its shard marker names"):
            entry.read_layer(1, rows)
    # what was read before the swap came from the marker's shard; the unverified read is today's (wrong) answer
    wrong = entry.read_layer(1, np.arange(16, 24), verify=False)
    np.testing.assert_array_equal(wrong, good[8:16])


def test_train_and_eval_refuse_a_swapped_shard_in_one_line(store_copy: Path, monkeypatch, capsys) -> None:
    run = next((store_copy / "runs").iterdir()).name
    for layer in range(3):  # whichever layer the recorded choice names, whichever rows the test split holds
        for dst in (0, 2, 3):
            _swap(store_copy, layer, 1, dst)
    code, err = _cli(monkeypatch, capsys, "eval", "--run", run, "--store", str(store_copy))
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "not the one its shard marker names" in lines[0], err
    code, err = _cli(monkeypatch, capsys, "train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text",
                     "--set", "max_steps=3", "--set", "batch_size=8", "--seed", "5", "--store", str(store_copy))
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # after train's one preset line
    assert len(lines) == 1 and "not the one its shard marker names" in lines[0], err
    assert not list((store_copy / "runs").glob("*/metrics.json"))[1:], "no run was trained on the wrong rows"
