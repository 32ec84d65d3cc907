"""The shared store over a real S3 API: a moto server on 127.0.0.1 started here, the store at s3://bucket/...
through s3fs (as a team would use it). Create + ingest, extract with three concurrent writers on one entry (every
shard encoded exactly once), kill -9 and resume, verify, read; and the exclusive create that shard claims rest on
(`Location.create_exclusive`: s3fs's "xb", a PutObject with If-None-Match: *) raced by many writers at once.

Needs the `s3-test` extra (moto with its server, s3fs); skipped with the reason when it is absent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny

pytest.importorskip("s3fs", reason="the S3 tests need the s3-test extra: pip install -e '.[s3-test]'")
pytest.importorskip("flask", reason="moto's server needs flask: pip install -e '.[s3-test]'")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need the s3-test extra: pip install -e '.[s3-test]'")

from stratalign.stages.extract import ExtractConfig, extract  # noqa: E402
from stratalign.store.feature_store import FeatureStore  # noqa: E402
from stratalign.store.location import Location  # noqa: E402
from stratalign.store.verify import verify_store  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
BUCKET = "stratalign-test"
SHARDS = 4  # 30 images in shards of 8 rows


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free port of 127.0.0.1 for this module; the AWS variables point boto (in this process
    and in the writers it starts) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3_store(s3_env, store_with_dataset):
    """A new store under its own prefix of the bucket, holding the toy dataset (its images stay on local disk)."""
    _, ds = store_with_dataset
    store = FeatureStore.open(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/store", "a", create=True)
    store.save_dataset(ds)
    return store


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{**dict(encoders=("tiny-image",), shard_rows=8, batch_size=3, progress=False, poll_s=0.05,
                                   loaders="threads"), **kw})


def _writer(store_url: str, delay_s: float, shard_rows: int = 8, start: Path | None = None) -> subprocess.Popen:
    """A separate extract process on the store; it prints how many shards it encoded. With `start`, it writes
    `<start>.ready-<pid>` once imported and waits for `start` to exist before extracting (a common start line)."""
    code = (
        "import json, os, sys, time; sys.path.insert(0, %r)\n"
        "from fake_encoders import load_tiny\n"
        "from stratalign.store.feature_store import FeatureStore\n"
        "from stratalign.stages.extract import ExtractConfig, extract\n"
        "s = FeatureStore.open(%r, 'a'); start = %r\n"
        "if start:\n"
        "    open(f'{start}.ready-{os.getpid()}', 'w').close()\n"
        "    while not os.path.exists(start): time.sleep(0.01)\n"
        "r = extract(s, 'toy', ExtractConfig(encoders=('tiny-image',), shard_rows=%d, batch_size=3, progress=False,"
        " poll_s=0.05, loaders='threads'), load=load_tiny)\n"
        "print(json.dumps({'encoded': sum(x.shards_encoded for x in r)}))\n"
    ) % (str(HERE), store_url, str(start) if start else "", shard_rows)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TINY_DELAY_S": str(delay_s)},
                            stdout=subprocess.PIPE, text=True)


def _markers(store: FeatureStore) -> list[str]:
    store.loc.fs.invalidate_cache()
    return sorted(store.loc.fs.glob(store.loc.path("features", "*", "_shards", "*.json")))


def _layers(store: FeatureStore) -> list[np.ndarray]:
    entry = store.find_entry("toy", "tiny-image")
    return [entry.read_layer(i) for i in range(len(entry.spec.dims))]


@pytest.fixture
def reference(tmp_path: Path, store_with_dataset) -> list[np.ndarray]:
    """The same extraction into a local store."""
    _, ds = store_with_dataset
    local = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    local.save_dataset(ds)
    extract(local, "toy", _cfg(), load=load_tiny)
    return _layers(local)


def test_create_extract_verify_read_over_s3(s3_store, reference) -> None:
    assert s3_store.url.startswith("s3://") and not s3_store.loc.is_local
    reports = extract(s3_store, "toy", _cfg(), load=load_tiny)
    assert sum(r.shards_encoded for r in reports) == SHARDS
    again = FeatureStore.open(s3_store.url, "r")
    assert again.datasets() == ["toy"] and again.dataset("toy").fingerprint == s3_store.dataset("toy").fingerprint
    entry = again.find_entry("toy", "tiny-image")
    assert entry.spec.format_version == 2 and entry.is_complete()
    for got, want in zip(_layers(again), reference):
        np.testing.assert_array_equal(got, want)
    rows = np.array([29, 3, 3, 17])
    np.testing.assert_array_equal(entry.read_layer(1, rows), reference[1][rows])
    report = verify_store(again)
    assert report.ok and report.problems == 0, report
    assert sum(r.shards_encoded for r in extract(s3_store, "toy", _cfg(), load=load_tiny)) == 0


def _race(loc: Location, name: str, n_threads: int) -> tuple[list[int], list[str]]:
    """n threads call create_exclusive on one file at the same instant: (winners, errors)."""
    barrier, wins, errors = threading.Barrier(n_threads), [], []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            if loc.create_exclusive(json.dumps({"writer": i}).encode(), "_claims", name):
                wins.append(i)
        except Exception as exc:  # e.g. a check-then-write fallback reading a file another writer replaced
            errors.append(repr(exc))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins, errors


def test_exclusive_create_has_one_winner_against_the_s3_api(s3_env) -> None:
    """Many writers race to create the same claim file at the same instant, round after round: exactly one wins
    each round (s3fs's "xb" is a conditional PutObject, If-None-Match: *, answered 412 to the losers). A
    check-then-write in its place fails this test (tried: two writers read a file the winner had replaced)."""
    loc = Location.from_url(f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}")
    for r in range(8):
        wins, errors = _race(loc, f"{r}.json", 6)
        assert not errors and len(wins) == 1, f"round {r}: {len(wins)} writers created the same file; {errors}"
        assert json.loads(loc.read_bytes("_claims", f"{r}.json")) == {"writer": wins[0]}


def test_three_writers_encode_every_shard_exactly_once(s3_store, tmp_path: Path) -> None:
    """Three extract processes start on one entry at the same moment (8 shards, ~0.4 s each): they share the
    shards, and the encode counts they report add up to the shard count: none encoded twice, none left out."""
    start = tmp_path / "go"
    writers = [_writer(s3_store.url, delay_s=0.2, shard_rows=4, start=start) for _ in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    start.touch()
    outs = [w.communicate(timeout=180)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0]
    encoded = [json.loads(out.strip().splitlines()[-1])["encoded"] for out in outs]
    assert sum(encoded) == 8, encoded  # no shard encoded twice, none left out
    assert sum(e > 0 for e in encoded) >= 2, encoded  # the writers did overlap
    assert len(_markers(s3_store)) == 8
    assert not s3_store.loc.fs.glob(s3_store.loc.path("features", "*", "_claims", "*.json"))  # claims released
    local = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    local.save_dataset(s3_store.dataset("toy"))
    extract(local, "toy", _cfg(shard_rows=4), load=load_tiny)
    for got, want in zip(_layers(FeatureStore.open(s3_store.url, "r")), _layers(local)):
        np.testing.assert_array_equal(got, want)


def test_kill9_mid_extraction_then_resume(s3_store, reference) -> None:
    writer = _writer(s3_store.url, delay_s=0.3)
    deadline = time.time() + 90
    while not _markers(s3_store) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    done_before = len(_markers(s3_store))
    assert 1 <= done_before < SHARDS, "the kill should land mid-extraction"
    reports = extract(s3_store, "toy", _cfg(), load=load_tiny)  # the dead writer's claim is stale: taken over
    assert sum(r.shards_encoded for r in reports) == SHARDS - done_before
    entry = FeatureStore.open(s3_store.url, "r").find_entry("toy", "tiny-image")
    assert entry.verify() == {"corrupt": [], "incomplete": []}
    for got, want in zip(_layers(FeatureStore.open(s3_store.url, "r")), reference):
        np.testing.assert_array_equal(got, want)
