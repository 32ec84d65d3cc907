"""What to extract and what came of it: the config both engines read and the per-encoder report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stratalign.device import PRECISIONS, resolve_precision
from stratalign.errors import StratalignError
from stratalign.store.feature_store import DEFAULT_SHARD_ROWS, ENTRY_FORMATS, LAYOUT_SHARDED

LOADER_KINDS = ("auto", "processes", "threads")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract; resolved once from the CLI or the caller."""

    encoders: tuple[str, ...]
    poolings: tuple[str, ...] = ()  # empty: each encoder's default pooling; "all": every pooling it supports
    dtype: str = "float16"
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int = 64
    device: str = "auto"
    skip_bad: bool = False
    loaders: str = "auto"  # "processes" | "threads" | "auto": processes for image encoders on CPU (Linux)
    loader_workers: int = 2
    prefetch_batches: int = 4
    poll_s: float = 2.0
    progress: bool = True
    torch_threads: int = 0  # torch intra-op threads; 0: on CPU every CPU available to the process
    claim_wait_s: float | None = None  # give up after this long without progress on shards others hold (None: wait)
    entry_format: int = LAYOUT_SHARDED  # layout of NEW entries (store.entry); a complete entry in another is reused
    # the encoder's forward: fp32 | bf16 (autocast) | auto (bf16 where the device has it); resolved when the config is
    # made, so entries record what ran (part of their key when not fp32: METHOD 1)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.loaders not in LOADER_KINDS:
            raise StratalignError(f"unknown loaders {self.loaders!r}: use {', '.join(LOADER_KINDS)}")
        if self.entry_format not in ENTRY_FORMATS:
            raise StratalignError(f"unknown entry format {self.entry_format!r}: use one of {ENTRY_FORMATS}")
        if self.loader_workers < 1:
            raise StratalignError(f"loader workers must be >= 1, got {self.loader_workers}")
        for name, low in (("batch_size", 1), ("shard_rows", 1), ("prefetch_batches", 1), ("torch_threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StratalignError(f"{name.replace('_', ' ')} must be an integer >= {low}, got {value!r} "
                                      f"(--{name.replace('_', '-')})")
        for name in ("poll_s", "claim_wait_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0 and value == value):
                raise StratalignError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not self.encoders:
            raise StratalignError("name at least one encoder (--encoder)")
        if self.precision not in PRECISIONS:
            raise StratalignError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)} (--precision)")
        if self.precision != "fp32":  # auto -> fp32 | bf16; bf16 without the hardware: one line
            object.__setattr__(self, "precision", resolve_precision(self.precision, _device_of(self.device)))

    @property
    def slots(self) -> int:
        """Batch slots of loader processes: the loaders' window, the hand-over queue, one batch waiting to be
        queued and one in the model."""
        return max(1, self.prefetch_batches) + 3


def _device_of(device: str) -> torch.device:
    """The device `device` names (auto: CUDA when present), without loading anything."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.split(":")[0])


@dataclass
class ExtractReport:
    """What one encoder's extraction did: counts and timings (the benchmark reads these)."""

    encoder: str
    entries: list[str]
    shards_total: int
    shards_encoded: int = 0
    rows_encoded: int = 0
    bad_rows: list[int] = field(default_factory=list)
    forward_s: float = 0.0
    wall_s: float = 0.0
    torch_threads: int = 0
    loaders: str = ""
    batches_stolen: int = 0  # batches the loader processes were too slow for, prepared by the loader thread

    @property
    def rows_per_s(self) -> float:
        return self.rows_encoded / self.wall_s if self.wall_s > 0 else 0.0
