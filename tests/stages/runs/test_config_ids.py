"""Run ids name the layer rule (form 2: <objective>-<head>-<chosen|last|vVtT>-n<pairs>-s<seed>-<hash>), so one cell's
chosen-layer and last-layer runs differ in the part a user reads and types as a prefix; the hash is the one every
id had before, and a run a store holds under its old (form-1) id keeps that id."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from old_store import FIXTURE, RUN_IDS
from toy_store import FAST, toy_store

from stratalign.errors import StratalignError
from stratalign.stages.layers import LayersConfig, choose, compute_layer_matrices, record_choice
from stratalign.stages.runs.config import RunConfig, resolve_run
from stratalign.stages.runs.training import train_run, train_runs
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import content_hash, run_id_of
from stratalign.store.runs import RunRegistry

RULES = {"auto": "chosen", "last": "last", "0,1": "v0t1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    store = toy_store(tmp_path_factory.mktemp("ids"))
    cfg = LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("cka",), k=4, permutations=0)
    record_choice(store, cfg, choose(compute_layer_matrices(store, cfg), "best", "cka"))
    return store


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{"dataset": "toy", "vision": "tiny-image", "text": "tiny-text", "n_pairs": 20, "options": FAST,
                        **kw})


def _readable(run_id: str) -> str:
    return run_id.rsplit("-", 1)[0]


def test_runs_of_one_cell_differing_in_the_layer_rule_say_so(store: FeatureStore) -> None:
    runs = {rule: resolve_run(store, _cfg(layers=rule)) for rule in RULES}
    for rule, run in runs.items():
        assert _readable(run.run_id) == f"clip-linear-{RULES[rule]}-n20-s0", rule
        # the hash is the content address every id had before: only the readable part is new
        assert run.run_id.endswith("-" + content_hash(run.identity(), length=12))
        assert run.run_id.rsplit("-", 1)[1] == run_id_of(run.identity()).rsplit("-", 1)[1]
    done = train_runs(store, [_cfg(layers="auto"), _cfg(layers="last")])
    assert [r.run_id for r in done] == [runs["auto"].run_id, runs["last"].run_id]
    reg = RunRegistry(store)
    # a prefix picks one rule's run; the prefix both share is ambiguous and lists them
    assert reg.resolve("clip-linear-last") == runs["last"].run_id
    assert reg.resolve("clip-linear-chosen-n20") == runs["auto"].run_id
    with pytest.raises(StratalignError, match="ambiguous") as err:
        reg.resolve("clip-linear-")
    assert runs["auto"].run_id in str(err.value) and runs["last"].run_id in str(err.value)
    assert train_run(store, _cfg(layers="last")).skipped


def test_a_run_recorded_under_its_form_1_id_keeps_it(store: FeatureStore) -> None:
    """A store written before ids named the layer rule holds the run under its form-1 id (same hash, same
    config.json but for run_id): the same request finds it there, done, and trains nothing."""
    new = train_run(store, _cfg(layers="last", seed=3))
    assert _readable(new.run_id) == "clip-linear-last-n20-s3"
    old = run_id_of(resolve_run(store, _cfg(layers="last", seed=3)).identity())
    assert old == f"clip-linear-n20-s3-{new.run_id.rsplit('-', 1)[1]}"
    root = store.loc.path("runs")
    os.rename(f"{root}/{new.run_id}", f"{root}/{old}")
    config = json.loads(store.loc.read_bytes("runs", old, "config.json"))
    store.loc.write_json({**config, "run_id": old}, "runs", old, "config.json")  # as the code before wrote it
    assert resolve_run(store, _cfg(layers="last", seed=3)).run_id == old
    again = train_run(store, _cfg(layers="last", seed=3))
    assert again.skipped and again.run_id == old and not store.loc.exists("runs", new.run_id)


def test_a_run_without_a_preset_is_named_as_before_and_a_held_run_keeps_its_id(store: FeatureStore) -> None:
    """preset=None (Python only: a run requested as every run before presets existed) gets the form-1 id in a store
    that does not hold it; the same settings asked for by preset find the run under whichever id the store holds."""
    from stratalign.train.presets import choose_preset

    schedule = tuple(choose_preset("cpu").preset.settings().items())
    by_preset = _cfg(layers="last", seed=5, preset="cpu")
    by_hand = _cfg(layers="last", seed=5, preset=None, options=schedule + FAST)
    assert resolve_run(store, by_hand).identity() == resolve_run(store, by_preset).identity()
    assert _readable(resolve_run(store, by_hand).run_id) == "clip-linear-n20-s5"
    assert _readable(resolve_run(store, by_preset).run_id) == "clip-linear-last-n20-s5"
    held = train_run(store, by_preset)
    assert resolve_run(store, by_hand).run_id == held.run_id and train_run(store, by_hand).skipped


def test_old_store_runs_keep_their_ids_and_prefixes(tmp_path) -> None:
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    reg = RunRegistry(FeatureStore.open(str(tmp_path / "store"), "r"))
    assert sorted(reg.ids()) == sorted(RUN_IDS)
    assert all(reg.config(rid)["run_id"] == rid for rid in RUN_IDS)
    assert reg.resolve("clip-linear-n12") == RUN_IDS[0] and reg.resolve("csa-") == RUN_IDS[3]


def test_runs_ls_fits_a_terminal_with_form_2_ids(store: FeatureStore) -> None:
    """The longest objective with the longest rule name: each id whole on one line of a 100-column terminal."""
    knn = train_run(store, _cfg(layers="auto", objective="clip+structure-knn", options=FAST + (("knn_k", 3),)))
    assert _readable(knn.run_id) == "clip_structure_knn-linear-chosen-n20-s0"
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "100", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "runs", "ls", "--store", store.url],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    assert max(len(line) for line in text.splitlines()) <= 100
    ids = RunRegistry(store).ids()
    assert len(ids) >= 4 and all(rid in text for rid in ids), text
