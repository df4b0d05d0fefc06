"""How many CPUs this process may really use, for ``WORKERS=auto``.

``os.cpu_count()`` counts the machine's cores, not what a container is given: a pod limited to
2 CPUs on a 64-core node would start 64 workers that the kernel then throttles. Two things
bound it: the process's CPU affinity (``taskset``, Docker's ``--cpuset-cpus``, the kubelet's
static CPU manager) and a cgroup v2 quota (``cpu.max``, what ``--cpus`` and a Kubernetes CPU
limit set), on the process's own cgroup or any above it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` grants, rounded up (a 1.5 CPU limit gives 2 workers, each
    throttled a little rather than half a core left idle); None without a quota ("max ...")."""
    fields = cpu_max.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cgroup_dir(proc_self_cgroup: str) -> str | None:
    """The process's cgroup v2 path from ``/proc/self/cgroup`` (the ``0::/path`` line)."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The affinity's CPU count, lowered by the smallest quota on the way from the process's
    cgroup up to the root; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        own = cgroup_dir(proc_self_cgroup.read_text())
    except OSError:
        own = None
    folder = root / own.lstrip("/") if own else root
    while True:
        try:
            quota = quota_cpus((folder / "cpu.max").read_text())
        except OSError:
            quota = None
        if quota is not None:
            cpus = min(cpus, quota)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return max(1, cpus)
