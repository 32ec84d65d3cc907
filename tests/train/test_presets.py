"""Trainer presets (docs/method.md § 3.8): auto -> cpu | gpu by the machine, --set wins over the preset, and the run id
hashes the resolved settings only (never the preset's name or the machine, unless auto was asked for)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.runs.config import ResolvedRun, RunConfig, resolve_run
from stratalign.train import TrainConfig
from stratalign.train.presets import PRESETS, SCHEDULE_FIELDS, apply_preset, choose_preset, describe

CPU = (("batch_size", 256), ("max_steps", 600), ("warmup_steps", 100), ("patience", 40), ("eval_every", 10))


def test_paper_is_methods_published_schedule_and_trainconfigs_defaults() -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert PRESETS["paper"].settings() == {k: defaults[k] for k in SCHEDULE_FIELDS}
    assert PRESETS["paper"].settings() == dict(batch_size=4096, max_steps=3000, warmup_steps=1000, patience=300,
                                               eval_every=10)
    assert PRESETS["cpu"].settings() == dict(CPU)


@pytest.mark.parametrize("cuda, expected, reason", [(False, "cpu", "no CUDA"), (True, "gpu", "CUDA available")])
def test_auto_follows_the_machine(cuda: bool, expected: str, reason: str) -> None:
    choice = choose_preset("auto", cuda=cuda)
    assert (choice.name, choice.requested, choice.reason) == (expected, "auto", reason)
    assert describe(choice).startswith(f"preset {expected} ({reason}): batch ")


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:1", "gpu")])
def test_auto_follows_a_device_override(device: str, expected: str) -> None:
    for cuda in (False, True):
        assert choose_preset("auto", {"device": device}, cuda=cuda).name == expected


def test_named_presets_ignore_the_machine() -> None:
    for name in PRESETS:
        assert choose_preset(name, cuda=False) == choose_preset(name, cuda=True)
        assert choose_preset(name, cuda=True).name == name


def test_unknown_preset_is_one_error_naming_the_choices() -> None:
    with pytest.raises(StratalignError, match=r"unknown preset 'bogus'; known: auto, cpu, gpu, paper"):
        choose_preset("bogus")


def test_set_overrides_win_and_are_shown() -> None:
    choice = choose_preset("cpu")
    settings = apply_preset(choice, {"max_steps": 50, "lam": 5.0})
    assert settings == {**dict(CPU), "max_steps": 50, "lam": 5.0}
    assert describe(choice, {"max_steps": 50, "lam": 5.0}) == (
        "preset cpu: batch 256, 50 steps (--set), warm-up 100, patience 40, eval every 10; --set lam=5.0")


@pytest.fixture
def tiny_store(store_with_dataset):
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False),
            load=load_tiny)
    return store


def _run(store, preset=None, options=()) -> ResolvedRun:
    return resolve_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last",
                                        objective="clip+structure", preset=preset, options=tuple(options)))


def test_run_id_is_the_resolved_settings_not_the_preset(tiny_store) -> None:
    by_preset = _run(tiny_store, "cpu", [("lam", 5.0)])
    spelt_out = _run(tiny_store, None, [*CPU, ("lam", 5.0)])
    # one content address; the readable part differs (a preset=None request is named as runs before presets were,
    # without the layer rule: stages.runs.config._run_id), and a store holding either form answers both
    assert by_preset.train == spelt_out.train
    assert by_preset.run_id.rsplit("-", 1)[1] == spelt_out.run_id.rsplit("-", 1)[1]
    assert by_preset.config_dict()["preset"] == "cpu" and "preset" not in spelt_out.config_dict()
    assert {k: by_preset.train[k] for k in SCHEDULE_FIELDS} == dict(CPU) and by_preset.train["lam"] == 5.0
    assert ResolvedRun.from_config(by_preset.config_dict()) == by_preset  # the preset survives config.json
    paper, none = _run(tiny_store, "paper"), _run(tiny_store)
    content = lambda run: run.run_id.rsplit("-", 1)[1]  # noqa: E731 - the content address (see above)
    assert content(paper) == content(none) != content(_run(tiny_store, "cpu"))


def test_set_wins_over_the_preset(tiny_store) -> None:
    run = _run(tiny_store, "paper", [("max_steps", 40), ("warmup_steps", 4)])
    assert (run.train["max_steps"], run.train["warmup_steps"], run.train["batch_size"]) == (40, 4, 4096)
    with pytest.raises(StratalignError, match="warm-up of 100 steps exceeds max_steps=50"):
        _run(tiny_store, "cpu", [("max_steps", 50)])  # the preset's warm-up is checked like any setting


def test_auto_is_the_only_machine_dependent_choice(tiny_store, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    ids = {}
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        ids[cuda] = {name: _run(tiny_store, name).run_id for name in ("auto", "cpu", "gpu", "paper")}
    assert ids[False]["auto"] == ids[False]["cpu"] and ids[True]["auto"] == ids[True]["gpu"]
    assert ids[False]["auto"] != ids[True]["auto"]
    assert all(ids[False][name] == ids[True][name] for name in ("cpu", "gpu", "paper"))


def test_unknown_preset_in_a_run_config_fails_before_any_work(tiny_store) -> None:
    with pytest.raises(StratalignError, match="unknown preset 'fast'"):
        _run(tiny_store, "fast")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_cli_bogus_preset_is_one_line_exit_2(tmp_path: Path, command: str) -> None:
    out = _cli(command, "--dataset", "d", "--vision", "v", "--text", "t", "--preset", "bogus",
               "--store", str(tmp_path / "none"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == "error: unknown preset 'bogus'; known: auto, cpu, gpu, paper"
    assert not (tmp_path / "none").exists()


def test_cli_train_prints_and_records_the_preset(tiny_store) -> None:
    out = _cli("train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
               "--preset", "cpu", "--set", "max_steps=6", "--set", "dim=8", "--store", str(tiny_store.url))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.splitlines()[0] == (
        "preset cpu: batch 256, 6 steps (--set), warm-up 100, patience 40, eval every 10; --set dim=8")
    rid = out.stdout.split()[1]  # stdout starts with the run line, as before presets
    config = json.loads((Path(tiny_store.url) / "runs" / rid / "config.json").read_text())
    assert config["preset"] == "cpu"
    assert config["train"]["batch_size"] == 256 and config["train"]["max_steps"] == 6 and config["train"]["dim"] == 8
    spelt_out = resolve_run(tiny_store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last",
                                                  options=(*CPU, ("max_steps", 6), ("dim", 8))))
    assert spelt_out.run_id == rid


def test_cli_help_names_every_preset() -> None:
    from stratalign.cli.values import PRESET_HELP
    from stratalign.train.presets import PRESET_NAMES

    assert all(f"{name} (" in PRESET_HELP or f"{name}," in PRESET_HELP for name in PRESET_NAMES)
