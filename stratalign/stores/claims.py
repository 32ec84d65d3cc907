"""Shard claims: how several extract processes (or Ray tasks) share one entry without encoding twice.

A worker claims shard s by creating `_claims/<s>.json` exclusively (O_EXCL on a local disk, a conditional
write on object stores that support it). The claim names host, pid and a heartbeat time. A claim is stale,
and may be taken over, when its process is gone (same host) or its heartbeat is older than the lease
(default 30 min, `STRATALIGN_CLAIM_LEASE_S`). A shard is done once its completion marker exists; the claim
is then removed. A killed worker leaves a claim and no marker, so a rerun re-encodes exactly that shard.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

import psutil

from stratalign.stores.location import Location

DEFAULT_LEASE_S = 1800.0


def lease_seconds() -> float:
    return float(os.environ.get("STRATALIGN_CLAIM_LEASE_S", DEFAULT_LEASE_S))


@dataclass
class Claim:
    host: str
    pid: int
    token: str
    heartbeat: float

    @classmethod
    def mine(cls) -> "Claim":
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time())

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def is_stale(self, lease: float) -> bool:
        if self.host == socket.gethostname():
            try:
                alive = psutil.pid_exists(self.pid) and psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return True
            if self.pid == os.getpid():
                return False
        return time.time() - self.heartbeat > lease


def try_claim(loc: Location, folder: str, shard: int, claim: Claim) -> bool:
    """Claim one shard; take over a stale claim. True when this worker now owns the shard."""
    name = f"{shard}.json"
    if loc.create_exclusive(claim.to_bytes(), folder, name):
        return True
    try:
        raw = loc.read_bytes(folder, name)
        held = Claim(**json.loads(raw))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return loc.create_exclusive(claim.to_bytes(), folder, name)
    if held.token == claim.token or not held.is_stale(lease_seconds()):
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
        held = json.loads(loc.read_bytes(folder, f"{shard}.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if held.get("token") == claim.token:
        loc.remove(folder, f"{shard}.json")
