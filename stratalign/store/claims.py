"""Shard claims: how several extract processes (or Ray tasks) share one entry without encoding twice.

A worker claims shard s by creating `_claims/<s>.json` exclusively (O_EXCL on a local disk, a conditional
write on object stores that support it). The claim names host, pid and a heartbeat time. A claim is stale,
and may be taken over, when its process is gone (same host) or its heartbeat is older than the lease
(default 30 min, `STRATALIGN_CLAIM_LEASE_S`). While a worker encodes, a `Heartbeat` thread rewrites its
claims with a fresh heartbeat every quarter lease, so only a worker that stopped beating loses a shard.
A shard is done once its completion marker exists; the claim is then removed. A killed worker leaves a
claim and no marker, so a rerun re-encodes exactly that shard.

A claim never wedges a store: its content is written with the exclusive create itself (Location.create_exclusive
links a complete temp file into place on a local disk), and a claim that cannot be read (empty, truncated, not a
claim) is stale. A claim also records when its process started, so a pid reused by another process does not
hold a shard. `describe_claims` says who holds what and until when (store ls / verify, a waiting extract);
`unlock` removes stale claims (`stratalign store unlock`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil

from stratalign.store.location import Location

DEFAULT_LEASE_S = 1800.0


def lease_seconds() -> float:
    return float(os.environ.get("STRATALIGN_CLAIM_LEASE_S", DEFAULT_LEASE_S))


def _started(pid: int) -> float:
    """When process `pid` started (0.0 when unknown): tells a live claimant from a reused pid."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


@dataclass
class Claim:
    host: str
    pid: int
    token: str
    heartbeat: float
    started: float = 0.0  # the claimant process's start time (0.0 in claims written before it was recorded)

    @classmethod
    def mine(cls) -> "Claim":
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time(), _started(os.getpid()))

    @classmethod
    def parse(cls, raw: bytes) -> "Claim | None":
        """The claim in a file's bytes, or None when they are not a readable claim (empty, truncated, garbage)."""
        try:
            obj = json.loads(raw)
            claim = cls(host=str(obj["host"]), pid=int(obj["pid"]), token=str(obj["token"]),
                        heartbeat=float(obj["heartbeat"]), started=float(obj.get("started") or 0.0))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return None
        return claim if claim.token and claim.pid > 0 else None

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def is_stale(self, lease: float) -> bool:
        if self.host == socket.gethostname():
            try:
                alive = psutil.pid_exists(self.pid) and psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return True
            if self.started and abs(_started(self.pid) - self.started) > 1.0:
                return True  # the pid now belongs to another process
            if self.pid == os.getpid():
                return False
        return time.time() - self.heartbeat > lease

    def expires_at(self, lease: float) -> float:
        """When the claim lapses unless its heartbeat is refreshed."""
        return self.heartbeat + lease


@dataclass(frozen=True)
class ClaimState:
    """One claim file as found: its shard, the claim (None when unreadable) and whether it is stale."""

    folder: str
    shard: int
    claim: Claim | None
    stale: bool

    def describe(self, lease: float | None = None) -> str:
        """'shard 3: held by host pid 123 (heartbeat 4 s ago), until 12:30:05 UTC' or why it is stale."""
        lease = lease_seconds() if lease is None else lease
        c = self.claim
        if c is None:
            return f"shard {self.shard}: unreadable claim (stale: a crash between create and write?)"
        age = max(0.0, time.time() - c.heartbeat)
        who = f"host {c.host} pid {c.pid} (heartbeat {age:.0f} s ago)"
        if self.stale:
            return f"shard {self.shard}: stale claim of {who}"
        until = time.strftime("%H:%M:%S UTC", time.gmtime(c.expires_at(lease)))
        return f"shard {self.shard}: held by {who} until {until} unless it keeps beating"


def read_claim(loc: Location, folder: str, shard: int) -> ClaimState | None:
    """The state of one shard's claim file; None when there is no claim."""
    try:
        raw = loc.read_bytes(folder, f"{shard}.json")
    except FileNotFoundError:
        return None
    claim = Claim.parse(raw)
    return ClaimState(folder, shard, claim, claim is None or claim.is_stale(lease_seconds()))


def describe_claims(loc: Location, folder: str) -> list[ClaimState]:
    """Every claim file of one claims folder, by shard (other files are left out)."""
    states = []
    for name in loc.listdir(folder):
        if name.endswith(".json") and name[:-5].isdigit():
            state = read_claim(loc, folder, int(name[:-5]))
            if state is not None:
                states.append(state)
    return sorted(states, key=lambda st: st.shard)


def unlock(loc: Location, folder: str, force: bool = False) -> list[ClaimState]:
    """Remove the stale claims of one claims folder (every claim with `force`); returns what was removed."""
    removed = []
    for state in describe_claims(loc, folder):
        if state.stale or force:
            loc.remove(folder, f"{state.shard}.json")
            removed.append(state)
    return removed


def store_claims(loc: Location) -> list[tuple[str, ClaimState]]:
    """(entry key, claim state) for every claim in a store's `features/<key>/_claims/` folders."""
    return [(key, state) for key in loc.listdirs("features")
            for state in describe_claims(loc, f"features/{key}/_claims")]


def unlock_store(loc: Location, force: bool = False) -> list[tuple[str, ClaimState]]:
    """Remove every stale claim of a store (every claim with `force`); returns what was removed."""
    return [(key, state) for key in loc.listdirs("features")
            for state in unlock(loc, f"features/{key}/_claims", force)]


def try_claim(loc: Location, folder: str, shard: int, claim: Claim) -> bool:
    """Claim one shard; take over a stale claim. True when this worker now owns the shard."""
    name = f"{shard}.json"
    if loc.create_exclusive(claim.to_bytes(), folder, name):
        return True
    try:
        raw = loc.read_bytes(folder, name)
    except FileNotFoundError:
        return loc.create_exclusive(claim.to_bytes(), folder, name)
    held = Claim.parse(raw)  # None: unreadable, so stale (nothing can ever refresh it)
    if held is not None and (held.token == claim.token or not held.is_stale(lease_seconds())):
        return held.token == claim.token
    # Stale: remove it only if it is still the very claim we judged stale, then race for it exclusively.
    try:
        if loc.read_bytes(folder, name) == raw:
            loc.remove(folder, name)
    except FileNotFoundError:
        pass
    return loc.create_exclusive(claim.to_bytes(), folder, name)


def release(loc: Location, folder: str, shard: int, claim: Claim) -> None:
    """Drop our claim on a shard (leave anyone else's alone)."""
    try:
        held = Claim.parse(loc.read_bytes(folder, f"{shard}.json"))
    except FileNotFoundError:
        return
    if held is not None and held.token == claim.token:
        loc.remove(folder, f"{shard}.json")


def refresh(loc: Location, folder: str, shard: int, claim: Claim) -> bool:
    """Rewrite our claim on a shard with a fresh heartbeat. False, and nothing written, when the claim
    file is gone or belongs to someone else (it was released, or taken over as stale)."""
    name = f"{shard}.json"
    try:
        held = Claim.parse(loc.read_bytes(folder, name))
    except FileNotFoundError:
        return False
    if held is None or held.token != claim.token:
        return False
    loc.write_bytes(dataclasses.replace(claim, heartbeat=time.time()).to_bytes(), folder, name)
    return True


class Heartbeat:
    """Keeps a worker's claims alive while it encodes: a daemon thread refreshes every held claim each
    `interval_s` (a quarter of the lease by default), so a shard that takes longer than the lease is not
    taken over by a worker on another host. Releases go through `release` so that a refresh never
    re-creates a claim file that was just removed."""

    def __init__(self, claim: Claim, interval_s: float | None = None) -> None:
        self.claim = claim
        self.interval_s = interval_s if interval_s is not None else max(0.05, lease_seconds() / 4)
        self.lost: list[tuple[str, int]] = []  # (claims folder, shard) taken over by someone else
        self._held: dict[tuple[str, int], tuple[Location, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, loc: Location, folder: str, shard: int) -> None:
        """Start refreshing our claim on `shard` in `folder` (call right after winning it)."""
        with self._lock:
            self._held[(loc.path(folder), shard)] = (loc, folder)

    def release(self, loc: Location, folder: str, shard: int) -> None:
        """Stop refreshing and drop our claim (never anyone else's)."""
        with self._lock:
            self._held.pop((loc.path(folder), shard), None)
            release(loc, folder, shard, self.claim)

    def held(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._held)

    def beat(self) -> None:
        """Refresh every held claim now; a claim no longer ours is dropped and recorded in `lost`."""
        with self._lock:
            for (path, shard), (loc, folder) in list(self._held.items()):
                try:
                    ok = refresh(loc, folder, shard, self.claim)
                except OSError:
                    continue  # a transient store error: the next beat tries again, well within the lease
                if not ok:
                    del self._held[(path, shard)]
                    self.lost.append((path, shard))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def start(self) -> "Heartbeat":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="stratalign-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
