"""`store repair` only moves forward (issue 29): it checks it can rebuild before touching anything, rebuilds in
_repair/<key> and swaps the files in; a repair stopped at any write and run again finishes, and `store repair`
exits 0 only when `store verify` would."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from corrupt_store import run_cli
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages import repair as repair_mod
from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import Location
from stratalign.store.verify import verify_store


class Killed(BaseException):
    """What a kill at a write looks like to the code above it: nothing after it runs (no except clause catches it)."""


def _image_entry(root: Path) -> Path:
    return next(p for p in (root / "features").iterdir() if "tiny-image" in p.name)


def _files(folder: Path) -> dict[str, object]:
    """Every file's bytes; shard markers as JSON without who wrote them when (a re-encoded shard's are new)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(folder))
            if rel.startswith("_shards/"):
                out[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("written_at", "host", "pid")}
            else:
                out[rel] = p.read_bytes()
    return out


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    return code, out + err


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_layer_metadata_not_json_is_rewritten_and_nothing_removed(store_copy: Path, pristine: Path) -> None:
    """Was: all 6 markers removed, then one error line, the entry left incomplete."""
    entry = _image_entry(store_copy)
    (entry / "layer_001" / "zarr.json").write_text("{not json")
    report = repair_mod.repair_store(FeatureStore.open(str(store_copy), "a"), progress=False, load=load_tiny)
    assert report.metadata == {entry.name: [1]} and report.repaired == {entry.name: []} and report.left == []
    assert _files(entry) == _files(pristine / "features" / entry.name)  # byte-identical, nothing re-encoded


def test_edited_layer_shape_is_seen_and_rewritten(store_copy: Path, pristine: Path) -> None:
    entry = _image_entry(store_copy)
    _edit_json(entry / "layer_002" / "zarr.json", lambda d: d.update(shape=[31, 8]))
    store = FeatureStore.open(str(store_copy), "a")
    with pytest.raises(StratalignError, match="layer_002/zarr.json does not describe layer 2 .*shape"):
        store.entry(entry.name).read_layer(2)
    assert not verify_store(store).ok
    report = repair_mod.repair_store(store, progress=False, load=load_tiny)
    assert report.metadata == {entry.name: [2]} and report.left == []
    assert _files(entry) == _files(pristine / "features" / entry.name)


def test_an_entry_with_edited_dims_is_left_untouched_and_repair_fails(store_copy: Path, monkeypatch, capsys) -> None:
    """Was: all markers removed, then an error; the entry became incomplete. Now: refused before anything is
    touched, named, non-zero."""
    entry = _image_entry(store_copy)
    _edit_json(entry / "zarr.json", lambda d: d["attributes"]["stratalign_entry"].update(dims=[16, 12, 9]))
    before = _files(entry)
    code, out = _cli(monkeypatch, capsys, "store", "repair", "--store", str(store_copy))
    assert code == 2 and "cannot repair" in out and "hashes to" in out and "Traceback" not in out, out
    assert _files(entry) == before and not (store_copy / repair_mod.STAGING).exists()


def test_an_encoder_that_no_longer_gives_the_entry_changes_nothing(store_copy: Path) -> None:
    from fake_encoders import TinyImageEncoder

    entry = _image_entry(store_copy)
    (entry / "_shards" / "1.json").unlink()
    before = _files(entry)

    def other_weights(spec: str, device: str):
        enc = load_tiny(spec, device)
        if isinstance(enc, TinyImageEncoder):
            enc.metadata = lambda: {"spec": spec, "weights_sha256": "retrained", "preprocessing": "grey 8x8"}
        return enc

    with pytest.raises(StratalignError, match="no longer gives this entry .*encoder changed"):
        repair_mod.repair_store(FeatureStore.open(str(store_copy), "a"), progress=False, load=other_weights)
    assert _files(entry) == before


def test_repair_exits_0_only_when_verify_would(store_copy: Path, monkeypatch, capsys) -> None:
    entry = _image_entry(store_copy)
    (entry / "_shards" / "2.json").unlink()  # a missing marker: was skipped as "incomplete", exit 0
    run = next((store_copy / "runs").iterdir())
    (run / "metrics.json").write_text("[]")  # something repair does not fix
    monkeypatch.setattr("stratalign.encoders.load_encoder", load_tiny)
    code, out = _cli(monkeypatch, capsys, "store", "repair", "--store", str(store_copy))
    assert code == 2 and "still wrong" in out and run.name in out and "problem(s) left" in out, out
    assert (entry / "_shards" / "2.json").exists()  # the missing shard was encoded meanwhile
    (run / "metrics.json").unlink()  # an unfinished run is no problem for verify
    assert _cli(monkeypatch, capsys, "store", "repair", "--store", str(store_copy))[0] == 0
    assert _cli(monkeypatch, capsys, "store", "verify", "--store", str(store_copy))[0] == 0


def _kill_at(monkeypatch, n: int) -> list[int]:
    """Make the n-th store write (Location.write_bytes or remove, or a file zarr writes) raise Killed; returns the
    count of writes seen."""
    from zarr.storage import LocalStore

    seen = [0]
    real_write, real_remove, real_set = Location.write_bytes, Location.remove, LocalStore.set

    def tick() -> None:
        seen[0] += 1
        if seen[0] == n:
            raise Killed

    def write(self, *a, **k):
        tick()
        return real_write(self, *a, **k)

    def remove(self, *a, **k):
        tick()
        return real_remove(self, *a, **k)

    async def zarr_set(self, *a, **k):
        tick()
        return await real_set(self, *a, **k)

    monkeypatch.setattr(Location, "write_bytes", write)
    monkeypatch.setattr(Location, "remove", remove)
    monkeypatch.setattr(LocalStore, "set", zarr_set)
    return seen


DAMAGES = {
    "marker-deleted": lambda e: (e / "_shards" / "1.json").unlink(),
    "chunk-flipped-and-layer-metadata-garbage": lambda e: (
        (e / "layer_000" / "c" / "3" / "0").write_bytes(b"\x00" * 40), (e / "layer_002" / "zarr.json").write_text("{")),
}


def kill_points_trial(root: Path, pristine: Path, kind: str, n: int, monkeypatch) -> tuple[bool, bool]:
    """Damage, repair killed at the n-th write, rerun: (the killed run reached write n, the rerun finished)."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine, root, symlinks=True)
    entry = _image_entry(root)
    DAMAGES[kind](entry)
    with monkeypatch.context() as m:
        seen = _kill_at(m, n)
        try:
            repair_mod.repair_store(FeatureStore.open(str(root), "a"), progress=False, load=load_tiny)
            reached = False
        except Killed:
            reached = True
    assert seen[0] >= min(n, 1)
    report = repair_mod.repair_store(FeatureStore.open(str(root), "a"), progress=False, load=load_tiny)
    ok = verify_store(FeatureStore.open(str(root), "r")).ok
    assert (report.left == []) == ok  # never "done" while verify fails
    assert ok and _files(entry) == _files(pristine / "features" / entry.name), (kind, n)
    return reached, ok


@pytest.mark.parametrize("kind", list(DAMAGES))
@pytest.mark.parametrize("n", [1, 6, 14])
def test_a_repair_stopped_at_a_write_then_rerun_finishes(tmp_path: Path, pristine: Path, kind: str, n: int,
                                                         monkeypatch) -> None:
    kill_points_trial(tmp_path / "store", pristine, kind, n, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_repair_stopped_at_every_write_then_rerun_finishes(tmp_path: Path, pristine: Path, kind: str,
                                                             monkeypatch) -> None:
    trials, n = 0, 1
    while kill_points_trial(tmp_path / "store", pristine, kind, n, monkeypatch)[0]:
        trials, n = trials + 1, n + 1
    print(f"\nfault table: repair stopped at each of {trials} writes ({kind}), then rerun: 0 failures")
    assert trials >= 10


@pytest.mark.slow
def test_kill9_of_repair_then_rerun_never_says_done_while_verify_fails(pristine: Path, tmp_path: Path) -> None:
    """A real `store repair` process killed with -9 at random times, then run again: the rerun exits 0 exactly when
    `store verify` does, and always ends with a whole store."""
    import os
    import random
    import signal
    import subprocess
    import time

    here = Path(__file__).resolve().parents[1]

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(here / "fault_cli.py"), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(here.parent), "TINY_DELAY_S": "0.3"})

    rng = random.Random(290)
    trials, killed, failures = 0, 0, []
    for trial in range(8):
        root = tmp_path / f"t{trial}"
        shutil.copytree(pristine, root, symlinks=True)
        entry = _image_entry(root)
        for s in (0, 2, 3):
            (entry / "_shards" / f"{s}.json").unlink()  # three shards to re-encode: ~4 s of repair
        proc = cli("store", "repair", "--store", str(root))
        try:
            proc.wait(timeout=rng.uniform(2.0, 7.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
        trials += 1
        again = cli("store", "repair", "--store", str(root))
        code = again.wait(timeout=120)
        ok = verify_store(FeatureStore.open(str(root), "r")).ok
        if (code == 0) != ok or not ok:
            failures.append(f"trial {trial}: rerun exit {code}, verify ok {ok}: {again.stderr.read()[-300:]!r}")
        time.sleep(0)
    print(f"\nfault table: kill -9 of repair: {trials} trials ({killed} killed mid-repair), {len(failures)} failures")
    assert not failures, failures
