"""A benchmark child's own peak resident set size."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB. Not ru_maxrss: a child started by fork + exec inherits
    in ru_maxrss the parent's resident size at the fork (a parent that built a big input made every child look big)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
