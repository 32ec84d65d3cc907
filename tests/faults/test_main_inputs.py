"""Bad input at the boundary (issue 19): every kind below is refused with one error line and a non-zero exit,
never a traceback, and leaves the store byte-for-byte unchanged (a hash of the whole tree before and after).

The CLI runs in-process (`stratalign.cli.main.main`) with the tiny test encoders, on one small store built once
per module: a COCO-style dataset, both tiny encoders extracted."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import caption_for, coco_toy_store
from fake_encoders import load_odd

HERE = Path(__file__).resolve().parents[1]


def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes (and every folder's and link's name)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes() if not p.is_symlink() else os.readlink(p).encode())
        h.update(str(Path(dirpath).relative_to(root)).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with dataset 'toy' (30 images, 60 captions) and both tiny encoders extracted, plus input files."""
    base = tmp_path_factory.mktemp("inputs")
    coco_toy_store(base, 16)
    (base / "binary.ids").write_bytes(bytes(range(256)) * 4)
    karpathy = {"images": [{"filename": "img000.png", "imgid": 0, "split": "train", "sentences": "not a list"}]}
    (base / "karpathy.json").write_text(json.dumps(karpathy))
    dup = ["id,image,caption"] + [f"1,imgs/img{i:03d}.png,{caption_for(i)}" for i in range(12)]
    (base / "dup.csv").write_text("\n".join(dup) + "\n")
    (base / "garbage.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    return base


S = "{store}"
COCO = ("ingest", "coco", "--captions", "{base}/coco.json", "--images", "{base}/imgs", "--store", S)
EXTRACT = ("extract", "--dataset", "toy", "-e", "tiny-image", "--store", S)
LAYERS = ("layers", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--store", S)
TRAIN = ("train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last", "--store", S)
SWEEP = ("sweep", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last", "--store", S)

# (id, argv, text the one error line must contain)
CASES = [
    ("extract-batch-0", (*EXTRACT, "--batch-size", "0"), "batch"),
    ("extract-batch-neg", (*EXTRACT, "--batch-size", "-1"), "batch"),
    ("extract-shard-rows-0", (*EXTRACT, "--shard-rows", "0"), "shard"),
    ("extract-loader-workers-0", (*EXTRACT, "--loader-workers", "0"), "loader"),
    ("extract-torch-threads-neg", (*EXTRACT, "--torch-threads", "-3"), "thread"),
    ("extract-dtype", (*EXTRACT, "--dtype", "float8"), "float8"),
    ("extract-engine", (*EXTRACT, "--engine", "spark"), "spark"),
    ("extract-loaders", (*EXTRACT, "--loaders", "gpus"), "gpus"),
    ("extract-no-dataset", ("extract", "--dataset", "nosuch", "-e", "tiny-image", "--store", S), "nosuch"),
    ("extract-pooling", (*EXTRACT, "--pooling", "median"), "median"),
    ("extract-wait-neg", (*EXTRACT, "--wait", "-1"), "wait"),
    ("layers-n-neg", (*LAYERS, "--n", "-5"), "n"),
    ("layers-n-0", (*LAYERS, "--n", "0"), "n"),
    ("layers-k-0", (*LAYERS, "--k", "0"), "k"),
    ("layers-k-word", (*LAYERS, "--k", "lots"), "lots"),
    ("layers-metric", (*LAYERS, "--metric", "vibes"), "vibes"),
    ("layers-choose", (*LAYERS, "--choose", "99,99"), "99"),
    ("layers-seed-neg", (*LAYERS, "--seed", "-1"), "seed"),
    ("train-n-pairs-neg", (*TRAIN, "--n-pairs", "-3"), "n-pairs"),
    ("train-seed-neg", (*TRAIN, "--seed", "-1"), "seed"),
    ("train-set-head-options", (*TRAIN, "--set", "head_options=5"), "head_options"),
    ("train-set-unknown", (*TRAIN, "--set", "nosuch=1"), "nosuch"),
    ("train-set-no-equals", (*TRAIN, "--set", "lr"), "key=value"),
    ("train-objective", (*TRAIN, "--objective", "magic"), "magic"),
    ("train-ids-binary", (*TRAIN, "--ids", "{base}/binary.ids"), "binary.ids"),
    ("train-ids-missing", (*TRAIN, "--ids", "{base}/nope.ids"), "nope.ids"),
    ("train-layers-range", ("train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text",
                            "--layers", "99,99", "--store", S), "99"),
    ("sweep-seed-neg", (*SWEEP, "--seed", "-1", "--objective", "clip"), "seed"),
    ("sweep-feature-precision", (*SWEEP, "--feature-precision", "fp16", "--objective", "clip"),
     "unknown feature precision 'fp16'"),
    ("layers-feature-precision", (*LAYERS, "--feature-precision", "half"), "unknown feature precision 'half'"),
    ("ingest-limit-neg", (*COCO, "--name", "lim", "--limit", "-5"), "limit"),
    ("ingest-limit-0", (*COCO, "--name", "lim", "--limit", "0"), "limit"),
    ("ingest-name-empty", (*COCO, "--name", ""), "name"),
    ("ingest-name-escape", (*COCO, "--name", "../x"), "../x"),
    ("ingest-captions-missing", ("ingest", "coco", "--captions", "{base}/nope.json", "--images", "{base}/imgs",
                                 "--name", "m", "--store", S), "nope.json"),
    ("ingest-captions-garbage", ("ingest", "coco", "--captions", "{base}/garbage.json", "--images", "{base}/imgs",
                                 "--name", "g", "--store", S), "garbage.json"),
    ("ingest-karpathy-sentences", ("ingest", "karpathy", "--split-file", "{base}/karpathy.json", "--images",
                                   "{base}/imgs", "--name", "k", "--store", S), "sentences"),
    ("ingest-duplicate-ids", ("ingest", "table", "--table", "{base}/dup.csv", "--id-col", "id", "--name", "d",
                              "--store", S), "id"),
    ("ingest-table-column", ("ingest", "table", "--table", "{base}/dup.csv", "--caption-col", "text", "--name", "d",
                             "--store", S), "text"),
    ("store-rm-unknown", ("store", "rm", "nosuchkey", "--yes", "--store", S), "nosuchkey"),
    ("store-rm-escape", ("store", "rm", "../../etc", "--yes", "--store", S), "../../etc"),
    ("store-rm-abort", ("store", "rm", "--dataset", "toy", "--store", S), "abort"),
    ("eval-no-run", ("eval", "--run", "nosuch", "--dataset", "toy", "--store", S), "nosuch"),
    ("store-proto", ("store", "ls", "--store", "nosuchproto://x"), "nosuchproto"),
]


@pytest.mark.parametrize("case_id, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_changes_nothing(world: Path, monkeypatch, capsys, case_id, argv,
                                                           needle) -> None:
    import stratalign.encoders as encoders
    from stratalign.cli.main import main
    from stratalign.stages import extract as extract_stage

    monkeypatch.setattr(encoders, "load_encoder", load_odd)
    monkeypatch.setattr(extract_stage, "encoder_identity", lambda spec: None)
    store = world / "store"
    args = [a.replace("{store}", str(store)).replace("{base}", str(world)) for a in argv]
    monkeypatch.setattr(sys, "argv", ["stratalign", *args])
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # a confirmation prompt reads end of input
    before = tree_hash(store)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code not in (0, None), f"{case_id} succeeded: {out}{err}"
    errors = [line for line in err.splitlines() if line.lower().startswith(("error", "aborted"))]
    assert len(errors) == 1, err
    assert needle.lower() in errors[0].lower(), errors[0]
    assert "Traceback" not in err
    assert tree_hash(store) == before, f"{case_id} changed the store"
