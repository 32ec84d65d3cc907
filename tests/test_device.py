"""CPU allocator setting: freed activations stay in the process instead of being page-faulted in afresh."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from stratalign.pipeline.device import resolve_device, retain_freed_memory
resolve_device("cpu")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)  # 64 MB, freed at once
before = faults()
for _ in range(5):
    torch.ones(16 << 20)
print(retain_freed_memory(), faults() - before)
"""


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_cpu_device_keeps_freed_memory_and_respects_a_user_allocator_setting() -> None:
    on, retained = _probe()
    off, returned = _probe(MALLOC_TRIM_THRESHOLD_="131072")  # the user's own setting wins
    assert on and not off
    # returned to the kernel on free, each 64 MB block is faulted in again (16,384 4-KiB pages a time)
    assert retained < returned / 2, (retained, returned)
