"""Claims that cannot wedge a store: atomic, validated on read, waited for with a message and a bound,
listed by `store ls` / `verify`, cleared by `store unlock` (issue 19)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from fake_encoders import TinyImageEncoder

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract_encoder, plan_entries
from stratalign.store.claims import Claim, describe_claims, store_claims, try_claim, unlock_store
from stratalign.store.location import Location
from stratalign.store.verify import verify_store


def _cfg(**kw) -> ExtractConfig:
    base = dict(encoders=("tiny-image",), shard_rows=8, batch_size=3, progress=False, poll_s=0.02)
    base.update(kw)
    return ExtractConfig(**base)


def _entry(store, ds):
    return plan_entries(store, ds, TinyImageEncoder(), _cfg())[0]


def _claim_file(entry, shard: int) -> Path:
    return Path(entry.store.loc.path(entry.claims_folder, f"{shard}.json"))


def test_exclusive_create_never_leaves_an_empty_file(tmp_path: Path) -> None:
    loc = Location.from_url(str(tmp_path))
    data = Claim.mine().to_bytes()
    assert loc.create_exclusive(data, "c", "0.json")
    assert not loc.create_exclusive(b"other", "c", "0.json")
    assert (tmp_path / "c" / "0.json").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"", b"{\"host\": \"x\", \"pi", b"\x00\xff garbage", b"[1, 2]", b"{}"])
def test_unreadable_claim_is_stale_and_taken_over(store_with_dataset, content: bytes) -> None:
    store, ds = store_with_dataset
    entry = _entry(store, ds)
    path = _claim_file(entry, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)  # what a kill or a full disk between create and write left (older code)
    [state] = entry.claim_states()
    assert state.stale and state.claim is None and "unreadable" in state.describe()
    report = extract_encoder(store, ds, TinyImageEncoder(), _cfg())
    assert report.shards_encoded == 4 and entry.is_complete()


def test_reused_pid_does_not_hold_a_shard(store_with_dataset) -> None:
    store, ds = store_with_dataset
    entry = _entry(store, ds)
    ghost = Claim(host=socket.gethostname(), pid=1, token="ghost", heartbeat=time.time(), started=12345.0)
    assert entry.claim(2, ghost)  # pid 1 is alive, but it is not the process that made the claim
    assert entry.claim_state(2).stale
    assert extract_encoder(store, ds, TinyImageEncoder(), _cfg()).shards_encoded == 4


def test_live_foreign_claim_is_waited_for_with_a_message_and_a_bound(store_with_dataset, capsys) -> None:
    store, ds = store_with_dataset
    entry = _entry(store, ds)
    other = Claim(host="another-host", pid=4242, token="other", heartbeat=time.time())
    assert entry.claim(3, other)
    with pytest.raises(StratalignError, match=r"gave up after waiting 0.3 s for shards 3 .*host another-host pid 4242"):
        extract_encoder(store, ds, TinyImageEncoder(), _cfg(claim_wait_s=0.3))
    err = capsys.readouterr().err
    assert "waiting for 1 shard(s)" in err and "held by host another-host pid 4242" in err and "until" in err
    assert entry.done_shards() == [0, 1, 2]  # the rest was encoded; the held shard waits for its owner


def test_ls_verify_list_claims_and_unlock_clears_stale_ones(store_with_dataset) -> None:
    from typer.testing import CliRunner

    from stratalign.cli.main import app

    store, ds = store_with_dataset
    entry = _entry(store, ds)
    assert entry.claim(0, Claim(host="another-host", pid=7, token="live", heartbeat=time.time()))
    assert entry.claim(1, Claim(host="another-host", pid=8, token="old", heartbeat=time.time() - 10 * 3600))
    _claim_file(entry, 2).write_bytes(b"")
    runner = CliRunner()
    ls = runner.invoke(app, ["store", "ls", "--store", store.url])
    assert ls.exit_code == 0
    claim_lines = [line for line in ls.output.splitlines() if line.startswith("claim ")]
    assert len(claim_lines) == 3 and "held by host another-host pid 7" in claim_lines[0]
    report = verify_store(store)
    states = sorted((f.shards[0], f.status) for f in report.findings if f.kind == "claim")
    assert states == [(0, "held"), (1, "stale"), (2, "stale")]
    out = runner.invoke(app, ["store", "unlock", "--store", store.url])
    assert out.exit_code == 0 and "2 claim(s) removed" in out.output
    assert [(k, s.shard) for k, s in store_claims(store.loc)] == [(entry.key, 0)]  # the live one is kept
    assert [s.shard for _, s in unlock_store(store.loc, force=True)] == [0]
    assert describe_claims(store.loc, entry.claims_folder) == []


def test_claim_file_content_round_trips(tmp_path: Path) -> None:
    loc = Location.from_url(str(tmp_path))
    mine = Claim.mine()
    assert try_claim(loc, "c", 0, mine)
    raw = json.loads((tmp_path / "c" / "0.json").read_bytes())
    assert raw["pid"] == os.getpid() and raw["started"] > 0
    assert Claim.parse((tmp_path / "c" / "0.json").read_bytes()) == mine


def test_the_wait_line_names_holders_or_says_nothing() -> None:
    """A shard whose claim went between our failed try and the look at its holders is tried again in silence
    (it printed 'held by other workers:' with nobody after the colon); a held one is named."""
    from types import SimpleNamespace

    from stratalign.stages.extract.shards import ClaimWait

    said: list[str] = []
    claim = SimpleNamespace(describe=lambda: "shard 3 by host:42 until 12:00")
    entry = SimpleNamespace(key="toy--entry", claim_state=lambda s: claim if s == 3 else None)
    wait = ClaimWait(poll_s=0.0, max_wait_s=None, say=said.append)
    wait.wait([entry], [1, 2])
    assert said == []
    wait.wait([entry], [3])
    assert len(said) == 1 and "shard 3 by host:42" in said[0] and said[0].startswith("waiting for 1 shard(s)")
