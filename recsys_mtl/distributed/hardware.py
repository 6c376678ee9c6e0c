"""What this machine has, read without importing torch (the CLI shows it in ``--help``)."""

from __future__ import annotations

import os

CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int:
    """Physical memory of this host, capped by the cgroup (v2 or v1) limit inside a container.

    Example::

        >>> host_memory_bytes() > 0
        True
    """
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():  # "max" (v2) means no limit; v1 reports a huge number instead
            total = min(total, int(value))
    return total
