"""Extraction mechanics: values, idempotence, resume after kill -9, concurrent writers, bad input.

Uses tiny deterministic encoders (tests/fake_encoders.py); real encoders are checked in test_encoders.py
and in the slow end-to-end test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import TinyImageEncoder, TinyTextEncoder, load_tiny

from stratalign.errors import StratalignError
from stratalign.pipeline.extract import ExtractConfig, extract, extract_encoder
from stratalign.stores.feature_store import FeatureStore
from stratalign.stores.media import load_image

HERE = Path(__file__).parent


def _cfg(**kw) -> ExtractConfig:
    base = dict(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=3, progress=False, poll_s=0.05)
    base.update(kw)
    return ExtractConfig(**base)


def _layer_bytes(store: FeatureStore, dataset: str, encoder: str, pooling: str | None = None) -> list[bytes]:
    entry = store.find_entry(dataset, encoder, pooling)
    return [entry.read_layer(i).tobytes() for i in range(len(entry.spec.dims))]


def test_values_equal_independent_forward(store_with_dataset) -> None:
    store, ds = store_with_dataset
    reports = extract(store, "toy", _cfg(poolings=()), load=load_tiny)
    assert [r.shards_encoded for r in reports] == [4, 8]  # 30 images, 60 captions, 8 rows a shard
    enc = TinyImageEncoder()
    images = [load_image(p) for p in ds.images["path"].to_list()]
    expected = enc.forward_pooled(enc.preprocess(images), ["avg"])["avg"]
    for layer, exp in enumerate(expected):
        got = store.features("toy", "tiny-image", layer)
        np.testing.assert_allclose(got.astype(np.float32), exp.numpy(), rtol=1e-3, atol=2e-3)
    txt = TinyTextEncoder()
    exp_t = txt.forward_pooled(txt.preprocess(ds.captions["text"].to_list()), ["mean"])["mean"][1]
    np.testing.assert_allclose(store.features("toy", "tiny-text", 1).astype(np.float32), exp_t.numpy(),
                               rtol=1e-3, atol=2e-3)


def test_two_poolings_one_pass(store_with_dataset) -> None:
    store, _ = store_with_dataset
    enc = TinyImageEncoder()
    extract_encoder(store, store.dataset("toy"), enc, _cfg(poolings=("avg", "max")))
    assert enc.forward_calls == 11  # shards of 8,8,8,6 rows in batches of 3: 3+3+3+2 batches, one pass each
    avg = store.features("toy", "tiny-image", 0, pooling="avg").astype(np.float32)
    mx = store.features("toy", "tiny-image", 0, pooling="max").astype(np.float32)
    np.testing.assert_allclose(mx, np.abs(avg), atol=1e-3)


def test_idempotent_rerun_encodes_nothing(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    before = _layer_bytes(store, "toy", "tiny-image")
    enc = TinyImageEncoder()
    report = extract_encoder(store, store.dataset("toy"), enc, _cfg())
    assert report.shards_encoded == 0 and enc.forward_calls == 0
    assert _layer_bytes(store, "toy", "tiny-image") == before


def test_float16_overflow_fails_clearly_and_keeps_store(store_with_dataset) -> None:
    store, ds = store_with_dataset
    enc = TinyImageEncoder(scale=1e6)
    with pytest.raises(StratalignError, match="beyond float16"):
        extract_encoder(store, ds, enc, _cfg())
    entry = next(iter(store.entries()))
    assert entry.done_shards() == [] and entry.verify()["corrupt"] == []
    report = extract_encoder(store, ds, TinyImageEncoder(scale=1e6), _cfg(dtype="float32"))
    assert report.shards_encoded == 4


def test_corrupt_image_mid_dataset(store_with_dataset) -> None:
    store, ds = store_with_dataset
    bad_row = 20  # in shard 2
    Path(ds.images["path"][bad_row]).write_bytes(b"garbage")
    with pytest.raises(StratalignError, match=f"image {ds.images['image_id'][bad_row]} .*changed since ingest"):
        extract_encoder(store, ds, TinyImageEncoder(), _cfg(loader_threads=1, prefetch_batches=1))
    done = next(iter(store.entries())).done_shards()
    assert 2 not in done and set(done) <= {0, 1, 3}  # finished shards kept, the bad one not marked
    report = extract_encoder(store, ds, TinyImageEncoder(), _cfg(skip_bad=True))
    assert report.bad_rows == [bad_row]
    marker = next(iter(store.entries())).markers(refresh=True)[2]
    assert marker["bad_rows"] == [bad_row]


def _script(store: str, extra_env: dict) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from fake_encoders import load_tiny\n"
        "from stratalign.stores.feature_store import FeatureStore\n"
        "from stratalign.pipeline.extract import ExtractConfig, extract\n"
        "s = FeatureStore.open(%r, 'a')\n"
        "extract(s, 'toy', ExtractConfig(encoders=('tiny-image',), shard_rows=8, batch_size=3, progress=False,"
        " poll_s=0.05), load=load_tiny)\n"
    ) % (str(HERE), store)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **extra_env})


def _markers(store_dir: Path) -> list[Path]:
    return sorted(store_dir.glob("features/*/_shards/*.json"))


def test_resume_after_kill9_is_byte_identical(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    reference = FeatureStore.open(str(tmp_path / "ref"), "a")
    reference.save_dataset(store.dataset("toy"))
    extract(reference, "toy", _cfg(encoders=("tiny-image",)), load=load_tiny)

    proc = _script(store.url, {"TINY_DELAY_S": "0.15"})
    deadline = time.time() + 60
    while len(_markers(Path(store.url))) < 1 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_markers(Path(store.url)))
    assert 1 <= done_before < 4, "the kill should land mid-extraction"

    entry = next(iter(store.entries()))
    enc = TinyImageEncoder()
    report = extract_encoder(store, store.dataset("toy"), enc, _cfg(encoders=("tiny-image",)))
    assert report.shards_encoded == 4 - done_before  # only unfinished shards are encoded again
    assert entry.is_complete() and entry.verify() == {"corrupt": [], "incomplete": []}
    assert _layer_bytes(store, "toy", "tiny-image") == _layer_bytes(reference, "toy", "tiny-image")


def test_two_processes_at_once_never_encode_a_shard_twice(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    procs = [_script(store.url, {"TINY_DELAY_S": "0.05"}) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    markers = [json.loads(p.read_text()) for p in _markers(Path(store.url))]
    assert sorted(m["shard"] for m in markers) == [0, 1, 2, 3]  # each shard written exactly once
    entry = next(iter(store.entries()))
    assert entry.verify() == {"corrupt": [], "incomplete": []}
    assert not list(Path(store.url).glob("features/*/_claims/*.json"))  # claims released
    reference = FeatureStore.open(str(tmp_path / "ref"), "a")
    reference.save_dataset(store.dataset("toy"))
    extract(reference, "toy", _cfg(encoders=("tiny-image",)), load=load_tiny)
    assert _layer_bytes(store, "toy", "tiny-image") == _layer_bytes(reference, "toy", "tiny-image")


def test_stale_claim_of_dead_process_is_taken_over(store_with_dataset) -> None:
    from stratalign.stores.claims import Claim

    store, ds = store_with_dataset
    enc = TinyImageEncoder()
    from stratalign.pipeline.extract import plan_entries

    entry = plan_entries(store, ds, enc, _cfg())[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = Claim(host=Claim.mine().host, pid=dead.pid, token="ghost", heartbeat=time.time())
    assert entry.claim(1, ghost)
    report = extract_encoder(store, ds, enc, _cfg())
    assert report.shards_encoded == 4


def test_full_disk_keeps_finished_shards_and_resumes(store_with_dataset, monkeypatch) -> None:
    import errno

    from stratalign.stores.location import Location

    store, ds = store_with_dataset
    real = Location.write_bytes
    written = {"n": 0}

    def flaky(self, data, *parts):
        if parts[-2:-1] == ("_shards",):
            written["n"] += 1
            if written["n"] > 2:  # the disk fills up after two shards
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *parts)

    monkeypatch.setattr(Location, "write_bytes", flaky)
    with pytest.raises(StratalignError, match="cannot write shard .*No space left on device.*rerun to resume"):
        extract_encoder(store, ds, TinyImageEncoder(), _cfg())
    entry = next(iter(store.entries()))
    assert len(entry.done_shards()) == 2 and entry.verify()["corrupt"] == []
    monkeypatch.setattr(Location, "write_bytes", real)
    report = extract_encoder(store, ds, TinyImageEncoder(), _cfg())
    assert report.shards_encoded == 2 and entry.is_complete()


def test_pooled_vectors_do_not_pin_hidden_states(store_with_dataset) -> None:
    """cls pooling is a view (h[:, 0]); what the pipeline keeps must own its memory, or every layer's
    full activations stay alive until the shard is written (seen as RSS growing with N)."""
    import torch

    from stratalign.pipeline.extract import ShardEncoder, plan_entries

    class ViewEncoder(TinyImageEncoder):
        def forward_pooled(self, batch, poolings):
            hidden = torch.randn(len(batch["pixels"]), 50, 16)
            return {p: [hidden[:, 0]] * 3 for p in poolings}

    store, ds = store_with_dataset
    enc = ViewEncoder()
    enc.dims = [16, 16, 16]
    worker = ShardEncoder(enc, ds, plan_entries(store, ds, enc, _cfg()), _cfg(), torch.device("cpu"))
    out = worker.forward({"pixels": torch.zeros(4, 64)})
    for arr in out["avg"]:
        assert arr.flags.owndata and arr.nbytes == 4 * 16 * 4
