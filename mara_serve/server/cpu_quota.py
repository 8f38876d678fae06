"""How many CPU threads torch should use when the operator does not say (`--torch-threads`).

torch starts one thread per core it may run on (the affinity mask) but ignores a cgroup CPU
quota: `docker run --cpus 2` or a Kubernetes CPU limit on a 64-core node still gets 64
spin-waiting threads, which the quota then throttles in the middle of every matmul. Like the
runtimes that read the quota themselves (Go's automaxprocs, the JVM), the server caps the
default at the quota, rounded down (at least 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs per second the cgroup quota allows (cgroup v2 `cpu.max`, else v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_threads(root: Path = CGROUP_ROOT) -> int | None:
    """The thread count a CPU quota calls for when it is below the cores the process may use;
    None when there is no quota or it does not cut anything (torch's default is right)."""
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, math.floor(limit))
    return threads if cores is None or threads < cores else None
