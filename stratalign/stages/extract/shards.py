"""Whole shards, the unit of work of both engines: claiming them in every entry of an encoder, encoding
one with a loaded model, writing its blocks (every layer, then the completion marker).

A shard is claimed in all of an encoder's entries (one per pooling) or in none; the markers are checked
again after the claims are won, so a shard another worker finished meanwhile is dropped, not re-encoded.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from stratalign.errors import StratalignError, preview
from stratalign.stages.extract.config import ExtractConfig
from stratalign.stages.extract.reader import BatchPreparer, batches
from stratalign.store.claims import Claim, Heartbeat
from stratalign.store.datasets import PairDataset
from stratalign.store.feature_store import FeatureEntry


class ShardEncoder:
    """Encodes whole shards with one loaded model: the unit of work of both engines."""

    def __init__(self, encoder: Any, ds: PairDataset, entries: list[FeatureEntry], cfg: ExtractConfig,
                 device: torch.device, prepare: BatchPreparer | None = None) -> None:
        self.encoder = encoder
        self.entries = entries
        self.cfg = cfg
        self.device = device
        self.prepare = prepare or BatchPreparer(encoder, ds, cfg.skip_bad, device)
        self.poolings = [e.spec.pooling for e in entries]
        self.bf16 = getattr(cfg, "precision", "fp32") == "bf16"  # resolved against the device by ExtractConfig
        self.forward_s = 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, list[np.ndarray]]:
        """One forward pass; only the pooled float32 vectors leave the device."""
        t0 = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # precision bf16: the forward under bf16 autocast (pooling itself is float32: core.pooling); fp32: none
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pooled = self.encoder.forward_pooled(batch, self.poolings)
        # np.array(copy=True): a pooled vector may be a view into a whole hidden state (cls = h[:, 0]);
        # holding the view until the shard is written would keep every layer's full activations alive.
        out = {p: [np.array(t.detach().float().cpu().numpy(), copy=True) for t in layers]
               for p, layers in pooled.items()}
        self.forward_s += time.perf_counter() - t0
        return out

    def encode_shard(self, shard: int) -> tuple[dict[str, list[np.ndarray]], list[int]]:
        """All layers of one shard for every pooling (no prefetching: used by the Ray engine)."""
        start, stop = self.entries[0].shard_rows_range(shard)
        parts: dict[str, list[list[np.ndarray]]] = {p: [] for p in self.poolings}
        bad_rows: list[int] = []
        for rows in batches(start, stop, self.cfg.batch_size):
            _, batch, bad = self.prepare(rows)
            bad_rows += bad
            for p, layers in self.forward(batch).items():
                parts[p].append(layers)
        return {p: [np.concatenate(c) for c in zip(*chunks)] for p, chunks in parts.items()}, bad_rows

    def write(self, shard: int, blocks: dict[str, list[np.ndarray]], bad_rows: list[int]) -> None:
        """Write the shard into every entry that lacks it; a failed write is a one-line error (resumable)."""
        info = {"bad_rows": bad_rows, "host": socket.gethostname(), "pid": os.getpid()}
        for entry in self.entries:
            if not entry.shard_done(shard):
                try:
                    entry.write_shard(shard, blocks[entry.spec.pooling], info)
                except OSError as exc:
                    raise StratalignError(
                        f"cannot write shard {shard} of {entry.key} to {entry.store.url}: {exc}; "
                        "finished shards are kept, rerun to resume"
                    ) from None


def pending_union(entries: list[FeatureEntry]) -> list[int]:
    """Shards that at least one of the entries still lacks."""
    return sorted(set().union(*(e.pending_shards() for e in entries)))


def release_all(entries: list[FeatureEntry], shard: int, claim: Claim, heartbeat: Heartbeat | None = None) -> None:
    """Drop our claim on a shard in every entry (others' claims are left alone)."""
    for e in entries:
        e.release(shard, claim, heartbeat)


def claim_all(entries: list[FeatureEntry], shard: int, claim: Claim, heartbeat: Heartbeat | None = None) -> bool:
    """Claim a shard in every entry that still lacks it, or in none (release on partial success).

    The markers are checked again after the claims are won: another worker may have written its marker
    and released its claim between our first check and our exclusive create, and the shard is then done."""
    got = []
    for e in entries:
        if e.shard_done(shard):
            continue
        if not e.claim(shard, claim, heartbeat):
            release_all(got, shard, claim, heartbeat)
            return False
        got.append(e)
    done = [e for e in got if e.shard_done(shard, refresh=True)]
    release_all(done, shard, claim, heartbeat)
    return len(done) < len(got)


def holders(entries: list[FeatureEntry], shards: list[int]) -> list[str]:
    """Who holds each of these shards and until when, one line per claim (the first entry's claims)."""
    lines = []
    for s in shards:
        state = entries[0].claim_state(s) if entries else None
        if state is not None:
            lines.append(state.describe())
    return lines


class ClaimWait:
    """The wait for shards other workers hold: a line saying who holds which shard and until when whenever that
    changes (at most every `every_s` otherwise), and an error once `max_wait_s` has passed without progress."""

    def __init__(self, poll_s: float, max_wait_s: float | None, say: Callable[[str], None], every_s: float = 60.0):
        self.poll_s, self.max_wait_s, self.say, self.every_s = poll_s, max_wait_s, say, every_s
        self.since: float | None = None
        self.last_line, self.last_said = "", 0.0

    def progress(self) -> None:
        self.since = None

    def wait(self, entries: list[FeatureEntry], pending: list[int]) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        held = holders(entries, pending)
        # no holder: their claims went between our try and this look (a worker finished or died); the next try
        # takes them, so nothing is said (it printed "held by other workers:" with nobody after the colon)
        line = (f"waiting for {len(pending)} shard(s) of {entries[0].key} held by other workers: "
                + "; ".join(held[:5]) + (f" (+{len(held) - 5} more)" if len(held) > 5 else "")
                + " -- `stratalign store unlock` clears stale claims") if held else ""
        if line and (line != self.last_line or now - self.last_said >= self.every_s):
            self.say(line)
            self.last_line, self.last_said = line, now
        if self.max_wait_s is not None and now - self.since >= self.max_wait_s:
            raise StratalignError(f"gave up after waiting {self.max_wait_s:g} s for shards {preview(pending)} of "
                                  f"{entries[0].key} held by other workers ({'; '.join(held[:3])}); finished shards "
                                  "are kept: rerun later, or `stratalign store unlock --force` if those workers are gone")
        time.sleep(self.poll_s)


def say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def claimed_shards(entries: list[FeatureEntry], claim: Claim, poll_s: float,
                    in_flight: set[int], stop: threading.Event, heartbeat: Heartbeat | None = None,
                    max_wait_s: float | None = None, say: Callable[[str], None] = say_stderr) -> Iterator[int]:
    """Yield shards this worker now owns until none is pending; wait while others hold the rest, saying who
    holds them and until when (see ClaimWait)."""
    waiting = ClaimWait(poll_s, max_wait_s, say)
    while not stop.is_set():
        pending = [s for s in pending_union(entries) if s not in in_flight]
        if not pending:
            return
        took = False
        for s in pending:
            if stop.is_set():
                return
            if claim_all(entries, s, claim, heartbeat):
                took = True
                waiting.progress()
                in_flight.add(s)
                yield s
        if not took and not stop.is_set():
            waiting.wait(entries, [s for s in pending_union(entries) if s not in in_flight] or pending)
