"""`store migrate`: rewrite a layout-1 entry (one chunk per shard: any read decodes whole shards) as layout 2
(sharded, small inner chunks: r rows cost O(r) bytes) under the SAME key, so that the runs, layer results,
graphs and extraction records that name the entry keep finding it (its spec records `key_layout`: 1).

Nothing is lost on a crash: the layout-2 copy is built beside the entry, in `_migrate/<key>/` (a store root
of its own), shard by shard from the old one, each old shard checked against its marker's sha256 first; the copy
is then read back and every shard of every layer compared (sha256 of the values) with the marker of the old
one; only then are the two folders swapped in one atomic rename (Linux renameat2 RENAME_EXCHANGE; elsewhere
two renames, which the next `store migrate` completes or undoes), and the old copy, now in `_migrate/`,
removed. The original shard markers are kept verbatim (their checksums are of the values, not the layout), with the
crc32c of the new shard files' inner chunks added (what a layout-2 read checks, store.shard_markers).
Local stores only: object stores have no rename (copy the store locally, migrate, sync it back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Callable

from stratalign.errors import StratalignError
from stratalign.store.entry import LAYOUT_CHUNK, LAYOUT_SHARDED, FeatureEntry, shard_sha
from stratalign.store.feature_store import FeatureStore
from stratalign.store.shard_markers import CHUNK_CRCS

STAGING = "_migrate"
VERIFIED = "verified"  # written in the staging folder once the copy equals the entry; the swap may then happen


@dataclass(frozen=True)
class Migration:
    """What migrating one entry did (or, with dry_run, would do)."""

    key: str
    action: str  # migrated | would migrate | skipped
    detail: str
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0


def _staging(store: FeatureStore, key: str) -> str:
    return store.loc.path(STAGING, key)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), a)


def _swap_in(store: FeatureStore, key: str) -> None:
    """Put the verified copy at features/<key>; the old entry ends up inside _migrate/<key>/."""
    live, staged = store.loc.path("features", key), os.path.join(_staging(store, key), "features", key)
    if _exchange(staged, live):
        return
    os.rename(live, os.path.join(_staging(store, key), "old"))  # a crash here leaves no features/<key>: `recover`
    os.rename(staged, live)  # puts the verified copy there


def recover(store: FeatureStore) -> list[str]:
    """Finish or undo what an interrupted migration left in _migrate/ (what happened, one line each)."""
    done = []
    for key in store.loc.listdirs(STAGING):
        folder, live = _staging(store, key), store.loc.path("features", key)
        staged, old = os.path.join(folder, "features", key), os.path.join(folder, "old")
        if not os.path.exists(live) and os.path.isdir(staged) and os.path.exists(os.path.join(folder, VERIFIED)):
            os.rename(staged, live)
            done.append(f"{key}: the verified layout-2 copy put in place (the swap was interrupted)")
        elif not os.path.exists(live) and os.path.isdir(old):
            os.rename(old, live)
            done.append(f"{key}: the original entry put back (the swap was interrupted before the copy was verified)")
        shutil.rmtree(folder)
        done.append(f"{key}: removed the leftovers in {STAGING}/{key}")
    return done


def _copy(entry: FeatureEntry, staging: str, progress: Callable[[int, int], None] | None) -> FeatureEntry:
    """The layout-2 copy of `entry` in the store at `staging`, shard by shard, markers verbatim."""
    spec = entry.spec
    target = FeatureStore.open(staging, "a", create=True)
    copy = target.create_entry(replace(spec, format_version=LAYOUT_SHARDED, chunk_rows=0, key_layout=LAYOUT_CHUNK))
    if copy.key != entry.key:
        raise StratalignError(f"the layout-2 copy of {entry.key} would be keyed {copy.key}: not migrated")
    markers = entry.markers()
    for s in range(spec.n_shards):
        blocks = [entry._shard_block(layer, s) for layer in range(len(spec.dims))]
        bad = [layer for layer, b in enumerate(blocks) if shard_sha(b) != markers[s]["sha256"][layer]]
        if bad:
            raise StratalignError(f"shard {s} of {entry.key} layers {bad} do not match their checksums: not migrated "
                                  "(run `stratalign store repair` first)")
        copy.write_shard(s, blocks, markers[s])  # the marker verbatim, plus the chunk crc32c of the new files
        if progress:
            progress(s + 1, spec.n_shards)
    return copy


def _check_copy(entry: FeatureEntry, staging: str) -> None:
    """Read the copy back from disk: every shard of every layer must hash to the original marker's sha256."""
    copy = FeatureStore.open(staging, "r").entry(entry.key)
    markers = entry.markers()
    copied = {s: {k: v for k, v in m.items() if k != CHUNK_CRCS} for s, m in copy.markers(refresh=True).items()}
    if copied != markers:
        raise StratalignError(f"the layout-2 copy of {entry.key} has other shard markers: not migrated")
    for s in range(entry.spec.n_shards):
        for layer in range(len(entry.spec.dims)):
            if shard_sha(copy._shard_block(layer, s)) != markers[s]["sha256"][layer]:
                raise StratalignError(f"the layout-2 copy of {entry.key} differs at shard {s} layer {layer}: not migrated")


def migrate_entry(store: FeatureStore, key: str, *, dry_run: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Migration:
    """Rewrite one layout-1 entry as layout 2 under its key (see the module docstring); other entries are
    skipped with the reason. Entries opened before the migration must be opened again."""
    entry = store.entry(key)
    if entry.spec.format_version != LAYOUT_CHUNK:
        return Migration(key, "skipped", f"already layout {entry.spec.format_version}")
    if not entry.is_complete():
        return Migration(key, "skipped", f"incomplete ({len(entry.pending_shards())} shards missing): finish its "
                                         "extraction first")
    if entry.claim_states():
        return Migration(key, "skipped", "shards are claimed by a writer (`store unlock` if it is dead)")
    size = store.loc.size("features", key)
    if dry_run:
        return Migration(key, "would migrate", f"{entry.spec.n_shards} shards x {len(entry.spec.dims)} layers",
                         bytes_before=size)
    store.require_writable()
    t0 = time.perf_counter()
    staging = _staging(store, key)
    if os.path.exists(staging):
        shutil.rmtree(staging)  # a copy a crash left unfinished (recover ran first: the entry is in place)
    _copy(entry, staging, progress)
    _check_copy(entry, staging)
    with open(os.path.join(staging, VERIFIED), "w") as f:
        f.write(key)
    _swap_in(store, key)
    shutil.rmtree(staging)
    return Migration(key, "migrated", f"{entry.spec.n_shards} shards x {len(entry.spec.dims)} layers, values checked",
                     bytes_before=size, bytes_after=store.loc.size("features", key), seconds=time.perf_counter() - t0)


def migrate_store(store: FeatureStore, keys: tuple[str, ...] = (), *, dry_run: bool = False,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[list[str], list[Migration]]:
    """(recovery lines, one Migration per entry): every layout-1 entry, or the entries `keys` names."""
    if not store.loc.is_local:
        raise StratalignError(f"store migrate works on local stores ({store.url} has no rename): copy the store to a "
                              "local folder, migrate it there and sync it back")
    recovered = [] if dry_run else recover(store)  # first: an interrupted swap may have left no features/<key>
    for key in keys:
        store.entry_folder(key)
    out = []
    for key in keys or tuple(store.entry_folders()):
        try:
            step = None if progress is None else (lambda done, total, k=key: progress(k, done, total))
            out.append(migrate_entry(store, key, dry_run=dry_run, progress=step))
        except StratalignError as exc:
            if keys:
                raise
            out.append(Migration(key, "skipped", str(exc)))
    if not dry_run and os.path.isdir(store.loc.path(STAGING)) and not os.listdir(store.loc.path(STAGING)):
        os.rmdir(store.loc.path(STAGING))
    store.forget_held()  # entries were swapped in under their keys: the held listing names the old ones
    return recovered, out
