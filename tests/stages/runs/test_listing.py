"""`runs ls` shows as overrides what a run set beyond its preset, not the preset's own schedule on every run."""

from __future__ import annotations

from stratalign.stages.runs.listing import train_overrides
from stratalign.train.config import TrainConfig
from stratalign.train.presets import PRESETS


def _config(preset: str | None, **options) -> dict:
    schedule = PRESETS[preset].settings() if preset else {}
    train = TrainConfig(objective="clip", head="linear", seed=1, **{**schedule, **options}).to_dict()
    return {"train": train, **({"preset": preset} if preset else {})}


def test_a_presets_schedule_is_not_an_override() -> None:
    assert train_overrides(_config("cpu")) == {}
    assert train_overrides(_config("cpu", max_steps=50, dim=64)) == {"max_steps": 50, "dim": 64}
    assert train_overrides(_config(None, max_steps=50)) == {"max_steps": 50}  # runs from before presets
    assert train_overrides(_config("paper")) == {}
