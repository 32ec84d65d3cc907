"""Device choice and CPU thread budget shared by extraction and training."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from stratalign.errors import StratalignError


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; a CUDA device without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StratalignError(f"device {device!r} requested but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise StratalignError(f"unknown device {device!r}: use auto, cpu or cuda[:n]") from None


def _cgroup_cpu_limit() -> float | None:
    """The container's CPU quota (cgroup v2 cpu.max, else v1 cfs quota/period), or None when unlimited."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def cpu_threads(requested: int = 0, reserve: int = 0) -> int:
    """Intra-op threads for torch: `requested` when > 0, else the available CPUs less `reserve` (the
    threads that decode and preprocess beside the model), at least 1, so the two never oversubscribe."""
    if requested < 0:
        raise StratalignError(f"torch threads must be >= 0 (0: automatic), got {requested}")
    return requested if requested > 0 else max(1, available_cpus() - max(0, reserve))


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run a block with `torch.set_num_threads(n)`, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
