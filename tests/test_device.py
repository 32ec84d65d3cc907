"""CPU allocator setting: applied once when a CPU device is chosen, left alone when the user tunes malloc.

Its effect (activations no longer page-faulted in afresh each forward) is measured in benchmarks/extract.py
and README's CPUs section: a fault count in a test proved flaky here, since the host VM reclaims idle pages
behind glibc's back (DAMON) and retained memory then faults again at times.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
from stratalign import device
before = device._retained
device.resolve_device("cpu")
print(before, device._retained, device.retain_freed_memory())
"""


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_cpu_device_applies_the_allocator_setting_once_unless_the_user_tunes_malloc() -> None:
    assert _probe() == ["None", "True", "True"]  # nothing at import; set by choosing the CPU
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072") == ["None", "False", "False"]
    assert _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072") == ["None", "False", "False"]
    assert _probe(LD_PRELOAD="/nonexistent/libjemalloc.so.2") == ["None", "False", "False"]
