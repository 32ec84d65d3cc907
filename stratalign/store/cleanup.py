"""Leftovers of killed writers: `<file>.tmp-<pid>[-<thread>]` temp files (see Location.write_bytes and
create_exclusive) whose process is gone. The next writer of a folder removes the ones in that folder
(`clean_folder`: an entry's on each extract, a dataset's on ingest, a run's on save); `stratalign store gc`
removes them store-wide (`collect`)."""

from __future__ import annotations

import os
import re

import psutil

from stratalign.store.location import Location

_TEMP = re.compile(r"\.tmp-(\d+)(?:-\d+)?$")


def _stale(path: str, name: str) -> bool:
    match = _TEMP.search(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    if not alive:
        return True
    try:  # a live pid: reused by another process when the file is older than the process
        return os.path.getmtime(path) < psutil.Process(pid).create_time()
    except (OSError, psutil.Error):
        return False


def clean_folder(loc: Location, *parts: str) -> list[str]:
    """Remove the stale temp files directly inside one folder (local stores only: others write no temp files)."""
    if not loc.is_local:
        return []
    folder = loc.path(*parts)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(folder, name)
        if _stale(path, name) and not os.path.isdir(path):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def leftovers(loc: Location) -> list[str]:
    """Every stale temp file of a local store (symlinks are not followed)."""
    if not loc.is_local:
        return []
    found = []
    for dirpath, _, filenames in os.walk(loc.root, followlinks=False):
        found += [os.path.join(dirpath, n) for n in filenames if _stale(os.path.join(dirpath, n), n)]
    return sorted(found)


def collect(loc: Location, dry_run: bool = False) -> list[str]:
    """Remove (or with dry_run only list) every stale temp file of the store."""
    found = leftovers(loc)
    if not dry_run:
        for path in found:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return found
