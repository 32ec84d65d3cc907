"""The store shows everything it holds: `store ls` lists every artifact with its size, orphans name what they lost,
`store rm` removes runs, single artifacts and all orphans; `runs ls | show | rm`. On a copy of the old-store fixture
(datasets, entries, runs with an eval file, a layer result, a choice, a kNN graph, a prompt cache)."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from stratalign.errors import StratalignError
from stratalign.store import inventory
from stratalign.store.feature_store import FeatureStore

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_3d4de15" / "store"
IMAGE_ENTRY = "toy--image--tiny-image--avg--a373f67358f9962b"
RUNS = ["clip-linear-n12-s0-c2322d26d74d", "clip_structure-linear-n12-s0-5a3151fa3dcf",
        "clip_structure_knn-linear-n12-s1-9515c6ad9da0", "csa-csa-n12-s0-c493673e6699"]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run the CLI's entry point in this process (a subprocess costs seconds of imports): (exit code, out, err)."""
    from stratalign.cli.main import main

    def run(*args: str, store: Path) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["stratalign", *args, "--store", str(store)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_inventory_lists_every_kind_with_sizes(store_dir: Path) -> None:
    items = inventory.inventory(FeatureStore.open(str(store_dir), "r"))
    assert Counter(a.kind for a in items) == {"dataset": 2, "entry": 4, "run": 4, "eval": 1, "layers": 1, "choice": 1,
                                              "graph": 1, "prompts": 1}
    assert not [a for a in items if a.orphan]
    for a in items:
        on_disk = store_dir.joinpath(*a.parts)
        size = sum(p.stat().st_size for p in on_disk.rglob("*") if p.is_file()) if a.folder else on_disk.stat().st_size
        assert a.bytes == size > 0, a
    assert {a.name for a in items if a.kind == "run"} == set(RUNS)
    assert [a.name for a in items if a.kind == "eval"] == [f"{RUNS[0]}/toy-resplit"]


def test_orphans_follow_what_is_gone_and_go_in_one_command(store_dir: Path, cli) -> None:
    store = FeatureStore.open(str(store_dir), "a")
    store.remove_entry(IMAGE_ENTRY)
    store.remove_dataset("toy-resplit")
    orphans = {(a.kind, a.name): a.orphan for a in inventory.inventory(store) if a.orphan}
    assert {k for k, _ in orphans} == {"run", "eval", "layers", "graph", "entry"}
    assert orphans["run", RUNS[1]] == f"entry {IMAGE_ENTRY} is gone"
    assert orphans["eval", f"{RUNS[0]}/toy-resplit"] == f"entry {IMAGE_ENTRY} is gone"
    assert orphans["entry", "toy-resplit--text--tiny-text--mean--e1ab24ac1f1df56d"] == "dataset toy-resplit is gone"
    listed = cli("store", "ls", store=store_dir)
    assert listed.returncode == 0 and f"orphan: entry {IMAGE_ENTRY} is gone" in listed.stdout
    assert "4 run (" in listed.stdout and "1 graph (" in listed.stdout
    removed = cli("store", "rm", "--orphans", "--yes", store=store_dir)
    assert removed.returncode == 0, removed.stderr
    left = inventory.inventory(FeatureStore.open(str(store_dir), "r"))
    assert not [a for a in left if a.orphan]
    assert Counter(a.kind for a in left) == {"dataset": 1, "entry": 1, "choice": 1, "prompts": 1}
    assert not (store_dir / "runs").exists() or not list((store_dir / "runs").iterdir())


def test_rm_one_artifact_and_refuse_bad_names(store_dir: Path, cli) -> None:
    layer_key = next(p.stem for p in (store_dir / "layers").glob("*.json"))
    out = cli("store", "rm", "--artifact", f"layers:{layer_key}", "--run", RUNS[3][:12], "-y", store=store_dir)
    assert out.returncode == 0, out.stderr
    assert not (store_dir / "layers" / f"{layer_key}.json").exists() and not (store_dir / "runs" / RUNS[3]).exists()
    assert (store_dir / "runs" / RUNS[0]).exists()
    bad = cli("store", "rm", "--artifact", "bogus:x", "-y", store=store_dir)
    assert bad.returncode != 0 and "unknown artifact kind 'bogus'" in bad.stderr + bad.stdout
    with pytest.raises(StratalignError, match="no graph 'nope'"):
        inventory.find(FeatureStore.open(str(store_dir), "r"), "graph", "nope")


def test_runs_ls_show_rm(store_dir: Path, cli) -> None:
    listed = cli("runs", "ls", "--objective", "clip+structure", store=store_dir)
    assert listed.returncode == 0, listed.stderr
    assert RUNS[1] in listed.stdout and RUNS[0] not in listed.stdout and "tiny-image" in listed.stdout
    assert "max_steps=12" in listed.stdout  # an override of the trainer's default, as the fixture's runs set it
    assert "no runs" in cli("runs", "ls", "--dataset", "other", store=store_dir).stdout
    shown = cli("runs", "show", RUNS[0][:14], "--json", store=store_dir)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)  # nothing but the document: for programs
    assert doc["config"]["run_id"] == RUNS[0] and doc["metrics"]["run_id"] == RUNS[0]
    assert doc["overrides"]["max_steps"] == 12 and doc["files"]["weights.safetensors"] > 0
    assert cli("runs", "rm", RUNS[0], "-y", store=store_dir).returncode == 0
    assert not (store_dir / "runs" / RUNS[0]).exists()
    assert "unknown" in cli("runs", "show", RUNS[0], store=store_dir).stderr


def test_runs_show_and_ls_are_short_for_a_person(store_dir: Path, cli) -> None:
    shown = cli("runs", "show", RUNS[0][:14], store=store_dir).stdout.splitlines()
    assert shown[0] == f"run {RUNS[0]}" and len(shown) <= 10 and not any("{" in line for line in shown)
    assert any(line.split()[0] == "test" and "i2t_R@1 50.00" in line for line in shown[1:])
    assert any(line.split()[0] == "files" and "weights.safetensors (" in line for line in shown[1:])
    listed = cli("runs", "ls", store=store_dir).stdout.splitlines()
    assert listed[0].endswith("(dataset toy, vision tiny-image, text tiny-text)")  # shared by every run: said once
    assert listed[1].split()[:3] == ["run", "layers", "objective"] and len(listed) == 2 + len(RUNS)
    wide = cli("runs", "ls", "--wide", store=store_dir).stdout.splitlines()
    assert {"vision", "text", "best_step", "seconds"} <= set(wide[1].split())


def test_store_ls_is_short_and_json_is_whole(store_dir: Path, cli) -> None:
    listed = cli("store", "ls", store=store_dir)
    assert listed.returncode == 0 and "4 run (" in listed.stdout
    assert not any(r in listed.stdout for r in RUNS)  # no row per artifact unless one is an orphan or asked for
    assert all(r in cli("store", "ls", "--kind", "run", store=store_dir).stdout for r in RUNS)
    doc = json.loads(cli("store", "ls", "--json", store=store_dir).stdout)
    assert [d["name"] for d in doc["datasets"]] == ["toy", "toy-resplit"] and len(doc["entries"]) == 4
    assert Counter(a["kind"] for a in doc["artifacts"]) == {"run": 4, "eval": 1, "layers": 1, "choice": 1, "graph": 1,
                                                           "prompts": 1}
    assert doc["claims"] == []


def test_store_verify_prints_problems_and_one_summary(store_dir: Path, cli) -> None:
    ok = cli("store", "verify", store=store_dir)
    assert ok.returncode == 0 and ok.stdout.splitlines() == [
        f"verified 2 dataset(s), 4 feature entries, 4 run(s) in {store_dir}: all ok"]
    verbose = cli("store", "verify", "--verbose", store=store_dir).stdout.splitlines()
    assert len(verbose) > 10 and any(line.startswith(f"ok {IMAGE_ENTRY}") for line in verbose)
    (store_dir / "runs" / RUNS[2] / "metrics.json").write_text("{")
    bad = cli("store", "verify", store=store_dir)
    lines = bad.stdout.splitlines()
    assert bad.returncode == 2 and len(lines) == 2 and lines[0].startswith(f"broken run {RUNS[2]}")
    assert lines[1].endswith(": 1 broken") and "1 problem(s)" in bad.stderr


def test_runs_ls_fits_a_terminal_without_breaking_ids(store_dir: Path) -> None:
    import os
    import re
    import subprocess

    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "100", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "runs", "ls", "--store", str(store_dir)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert all(r in text for r in RUNS)  # each id on one line
