"""Extraction mechanics: values, idempotence, resume after kill -9, concurrent writers, bad input.

Uses tiny deterministic encoders (tests/fake_encoders.py); real encoders are checked in tests/encoders/test_base_encoders.py
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
from stratalign.stages.extract import ExtractConfig, extract, extract_encoder
from stratalign.store.feature_store import FeatureStore
from stratalign.store.media import load_image

HERE = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> ExtractConfig:
    base = dict(encoders=("tiny-image", "tiny-text"), shard_rows=8, batch_size=3, progress=False, poll_s=0.05)
    base.update(kw)
    return ExtractConfig(**base)


def _layer_bytes(store: FeatureStore, dataset: str, encoder: str, pooling: str | None = None) -> list[bytes]:
    entry = store.find_entry(dataset, encoder, pooling)
    return [entry.read_layer(i).tobytes() for i in range(len(entry.spec.dims))]


@pytest.mark.parametrize("loaders", ["processes", "threads"])
def test_values_equal_independent_forward(store_with_dataset, loaders) -> None:
    store, ds = store_with_dataset
    reports = extract(store, "toy", _cfg(poolings=(), loaders="auto" if loaders == "processes" else loaders),
                      load=load_tiny)
    assert [r.shards_encoded for r in reports] == [4, 8]  # 30 images, 60 captions, 8 rows a shard
    assert [r.loaders for r in reports] == [loaders, "threads"]  # auto: processes for images on CPU
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


@pytest.mark.parametrize("loaders", ["processes", "threads"])
def test_corrupt_image_mid_dataset(store_with_dataset, loaders) -> None:
    store, ds = store_with_dataset
    bad_row = 20  # in shard 2
    Path(ds.images["path"][bad_row]).write_bytes(b"garbage")
    with pytest.raises(StratalignError, match=f"image {ds.images['image_id'][bad_row]} .*changed since ingest"):
        extract_encoder(store, ds, TinyImageEncoder(), _cfg(loader_workers=1, prefetch_batches=1, loaders=loaders))
    done = next(iter(store.entries())).done_shards()
    assert 2 not in done and set(done) <= {0, 1, 3}  # finished shards kept, the bad one not marked
    report = extract_encoder(store, ds, TinyImageEncoder(), _cfg(skip_bad=True, loaders=loaders))
    assert report.loaders == loaders and report.bad_rows == [bad_row]
    marker = next(iter(store.entries())).markers(refresh=True)[2]
    assert marker["bad_rows"] == [bad_row]


def _script(store: str, extra_env: dict) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from fake_encoders import load_tiny\n"
        "from stratalign.store.feature_store import FeatureStore\n"
        "from stratalign.stages.extract import ExtractConfig, extract\n"
        "s = FeatureStore.open(%r, 'a')\n"
        "extract(s, 'toy', ExtractConfig(encoders=('tiny-image',), shard_rows=8, batch_size=3, progress=False,"
        " poll_s=0.05), load=load_tiny)\n"
    ) % (str(HERE), store)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **extra_env})


def _stat(pid: int) -> list[str]:
    """State, parent pid, ... of a process from /proc (empty when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return bool(stat) and stat[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Live child processes of pid (Linux /proc)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [c for c in pids if _alive(c) and int(_stat(c)[1]) == pid]


def _markers(store_dir: Path) -> list[Path]:
    return sorted(store_dir.glob("features/*/_shards/*.json"))


def test_resume_after_kill9_is_byte_identical(tmp_path: Path, store_with_dataset) -> None:
    store, _ = store_with_dataset
    reference = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    reference.save_dataset(store.dataset("toy"))
    extract(reference, "toy", _cfg(encoders=("tiny-image",)), load=load_tiny)

    proc = _script(store.url, {"TINY_DELAY_S": "0.15"})
    deadline = time.time() + 60
    while len(_markers(Path(store.url))) < 1 and time.time() < deadline:
        time.sleep(0.02)
    children = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_markers(Path(store.url)))
    assert 1 <= done_before < 4, "the kill should land mid-extraction"
    assert len(children) >= 2  # its loader processes (and multiprocessing's resource tracker) ...
    deadline = time.time() + 10
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not [c for c in children if _alive(c)]  # ... die with it

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
    reference = FeatureStore.open(str(tmp_path / "ref"), "a", create=True)
    reference.save_dataset(store.dataset("toy"))
    extract(reference, "toy", _cfg(encoders=("tiny-image",)), load=load_tiny)
    assert _layer_bytes(store, "toy", "tiny-image") == _layer_bytes(reference, "toy", "tiny-image")


def test_stale_claim_of_dead_process_is_taken_over(store_with_dataset) -> None:
    from stratalign.store.claims import Claim

    store, ds = store_with_dataset
    enc = TinyImageEncoder()
    from stratalign.stages.extract import plan_entries

    entry = plan_entries(store, ds, enc, _cfg())[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = Claim(host=Claim.mine().host, pid=dead.pid, token="ghost", heartbeat=time.time())
    assert entry.claim(1, ghost)
    report = extract_encoder(store, ds, enc, _cfg())
    assert report.shards_encoded == 4


def test_full_disk_keeps_finished_shards_and_resumes(store_with_dataset, monkeypatch) -> None:
    import errno

    from stratalign.store.location import Location

    store, ds = store_with_dataset
    real = Location.write_bytes
    written = {"n": 0}

    def flaky(self, data, *parts, **kw):
        if parts[-2:-1] == ("_shards",):
            written["n"] += 1
            if written["n"] > 2:  # the disk fills up after two shards
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *parts, **kw)

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

    from stratalign.stages.extract import ShardEncoder, plan_entries

    class ViewEncoder(TinyImageEncoder):
        def forward_pooled(self, batch, poolings):
            hidden = torch.randn(len(batch["pixel_values"]), 50, 16)
            return {p: [hidden[:, 0]] * 3 for p in poolings}

    store, ds = store_with_dataset
    enc = ViewEncoder()
    enc.dims = [16, 16, 16]
    worker = ShardEncoder(enc, ds, plan_entries(store, ds, enc, _cfg()), _cfg(), torch.device("cpu"))
    out = worker.forward({"pixel_values": torch.zeros(4, 3, 8, 8)})
    for arr in out["avg"]:
        assert arr.flags.owndata and arr.nbytes == 4 * 16 * 4


def test_claim_won_just_after_another_worker_finished_is_dropped(store_with_dataset, monkeypatch) -> None:
    """Another worker writes shard 0's marker and releases its claim between our marker check and our
    exclusive claim: we win the claim, but must see the marker and not encode the shard again."""
    import torch

    from stratalign.stages.extract import ShardEncoder, plan_entries
    from stratalign.store import claims

    store, ds = store_with_dataset
    cfg = _cfg()
    entries = plan_entries(store, ds, TinyImageEncoder(), cfg)
    other = ShardEncoder(TinyImageEncoder(), ds, entries, cfg, torch.device("cpu"))
    real_try_claim = claims.try_claim
    raced = []

    def racing_try_claim(loc, folder, shard, claim):
        if shard == 0 and not raced:
            raced.append(shard)
            other.write(0, *other.encode_shard(0))  # the other worker finishes and has released its claim
        return real_try_claim(loc, folder, shard, claim)

    monkeypatch.setattr(claims, "try_claim", racing_try_claim)
    enc = TinyImageEncoder()
    report = extract_encoder(store, ds, enc, cfg)
    assert raced == [0]
    assert report.shards_encoded == 3 and enc.forward_calls == 8  # shards 1-3 only: 3 + 3 + 2 batches
    assert entries[0].is_complete() and entries[0].verify() == {"corrupt": [], "incomplete": []}
    assert not list(Path(store.url).glob("features/*/_claims/*.json"))


def test_heartbeat_keeps_a_slow_shard_from_being_taken_over(store_with_dataset, monkeypatch) -> None:
    """Shards take longer than the lease; the worker runs 'on another host' (so only its heartbeat can
    keep its claims fresh) while a challenger keeps trying to take them over."""
    import dataclasses
    import threading

    from stratalign.store.claims import Claim

    lease = 1.0
    monkeypatch.setenv("STRATALIGN_CLAIM_LEASE_S", str(lease))
    remote = Claim(host="worker-on-another-host", pid=1, token="remote", heartbeat=0.0)
    monkeypatch.setattr(Claim, "mine", classmethod(lambda cls: dataclasses.replace(remote, heartbeat=time.time())))
    store, ds = store_with_dataset
    cfg = _cfg(shard_rows=16, batch_size=8)  # 2 shards of 2 batches, 0.8 s each: 1.6 s a shard
    from stratalign.stages.extract import plan_entries

    entry = plan_entries(store, ds, TinyImageEncoder(), cfg)[0]
    challenger = Claim("challenger-host", os.getpid(), "challenger", time.time())
    stolen, beats, done = [], {}, threading.Event()

    def challenge() -> None:
        while not done.is_set():
            for s in range(entry.spec.n_shards):
                path = Path(store.url) / "features" / entry.key / "_claims" / f"{s}.json"
                try:
                    held = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
                if held["token"] != "remote":
                    continue
                beats.setdefault(s, []).append(held["heartbeat"])
                if entry.claim(s, challenger):
                    stolen.append(s)
                    entry.release(s, challenger)
            time.sleep(0.05)

    thread = threading.Thread(target=challenge, daemon=True)
    thread.start()
    try:
        report = extract_encoder(store, ds, TinyImageEncoder(delay_s=0.8), cfg)
    finally:
        done.set()
        thread.join()
    assert stolen == []
    assert report.shards_encoded == 2 and entry.is_complete()
    assert max(max(b) - min(b) for b in beats.values()) > lease / 2  # the claim file was refreshed meanwhile


def test_heartbeat_refreshes_only_our_claims_and_never_resurrects_a_released_one(tmp_path: Path) -> None:
    from stratalign.store.claims import Claim, Heartbeat, refresh, try_claim
    from stratalign.store.location import Location

    loc = Location.from_url(str(tmp_path))
    mine = Claim("h", os.getpid(), "mine", 1.0)
    theirs = Claim("h", os.getpid(), "theirs", 1.0)
    assert try_claim(loc, "c", 0, mine) and try_claim(loc, "c", 1, theirs)
    assert refresh(loc, "c", 0, mine) and json.loads(loc.read_bytes("c", "0.json"))["heartbeat"] > 1.0
    assert not refresh(loc, "c", 1, mine)  # someone else's: left untouched
    assert json.loads(loc.read_bytes("c", "1.json"))["heartbeat"] == 1.0
    hb = Heartbeat(mine, interval_s=0.01)
    hb.hold(loc, "c", 0)
    hb.hold(loc, "c", 1)  # not ours: dropped at the first beat and reported lost
    with hb:
        time.sleep(0.1)
        hb.release(loc, "c", 0)
        time.sleep(0.1)
    assert not loc.exists("c", "0.json")  # released while beating, never written back
    assert hb.held() == [] and hb.lost == [(loc.path("c"), 1)]
    assert json.loads(loc.read_bytes("c", "1.json"))["token"] == "theirs"


def test_cpu_extraction_sets_torch_threads_and_restores_them(store_with_dataset, monkeypatch) -> None:
    import torch

    from stratalign import device as dev

    seen: list[int] = []

    class ThreadSpy(TinyImageEncoder):
        def forward_pooled(self, batch, poolings):
            seen.append(torch.get_num_threads())
            return super().forward_pooled(batch, poolings)

    store, ds = store_with_dataset
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(dev, "available_cpus", lambda: 4)
        report = extract_encoder(store, ds, ThreadSpy(), _cfg(loader_workers=2, poolings=("avg",)))
        assert set(seen) == {4} and report.torch_threads == 4  # every available CPU, not torch's default
        assert torch.get_num_threads() == 1  # restored
        seen.clear()
        report = extract_encoder(store, ds, ThreadSpy(), _cfg(torch_threads=3, poolings=("max",)))
        assert set(seen) == {3} and report.torch_threads == 3
        assert dev.cpu_threads(0, reserve=8) == 1  # never below one, never oversubscribed by loaders
        with pytest.raises(StratalignError, match="torch threads must be >= 0"):
            dev.cpu_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_available_cpus_follows_affinity_and_quota(monkeypatch) -> None:
    from stratalign import device as dev

    n = len(os.sched_getaffinity(0))
    assert 1 <= dev.available_cpus() <= n
    monkeypatch.setattr(dev, "_cgroup_cpu_limit", lambda: 0.5)
    assert dev.available_cpus() == 1


def test_loaders_run_at_most_prefetch_batches_ahead(store_with_dataset) -> None:
    """Memory stays a few batches whatever the shard size: the loaders never prepare a whole shard ahead."""
    import threading as th

    lock, state = th.Lock(), {"prepared": 0, "consumed": 0, "ahead": 0}

    class Counting(TinyImageEncoder):
        def preprocess(self, items):
            with lock:
                state["prepared"] += 1
                state["ahead"] = max(state["ahead"], state["prepared"] - state["consumed"])
            return super().preprocess(items)

        def forward_pooled(self, batch, poolings):
            time.sleep(0.02)  # a slow model: fast loaders would otherwise run through the whole shard
            with lock:
                state["consumed"] += 1
            return super().forward_pooled(batch, poolings)

    store, ds = store_with_dataset
    report = extract_encoder(store, ds, Counting(), _cfg(shard_rows=30, batch_size=1, prefetch_batches=2,
                                                         loader_workers=2, loaders="threads"))
    assert report.shards_encoded == 1 and state["consumed"] == 30
    # the loaders' window (2) + the hand-over queue (1) + one waiting to be queued + one in the model: never
    # the 30 batches of the shard
    assert state["ahead"] <= 2 + 1 + 2, state
