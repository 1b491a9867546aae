"""How many worker processes a study gets by default (``--workers auto``): one per core this
process may use, as far as memory allows.

Small Keras models are bound by per-step overhead, so single-threaded workers, one per core,
give the most trials per second (``../shared/FACTS.md``: two on 2 cores nearly double the
throughput of one). "May use" is the smallest of: the CPUs the process is allowed to run on
(``os.sched_getaffinity``), the cgroup's CPU quota (a container limited to 1.5 CPUs gets 1
worker, not one per host core), and the memory available to it divided by what a worker holds.

Light: reads ``/proc`` and ``/sys/fs/cgroup`` and asks psutil; imports nothing heavy.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

# What one worker process holds at most: TensorFlow, the data as tensors and what up to
# trials_per_worker (20) models leak. make bench's memory figure (2026-11-30, 40 one-epoch
# trials in 2 worker processes): 1.6 GB after a worker's first trial, 2.2 GB at most after
# its 20th (the trials' rss_mb); 2.5 GB leaves room for larger models.
WORKER_BYTES = 5 * 2**29
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Cores:
    """The worker count ``auto`` chose and what limited it."""
    workers: int
    cpus: int                 # CPUs this process may run on
    quota: float | None       # the cgroup's CPU quota in CPUs, None when unlimited
    memory_workers: int       # workers the available memory holds

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return (f"{self.workers} (auto: {self.cpus} usable CPUs, CPU quota {quota}, memory "
                f"for {self.memory_workers} workers of {WORKER_BYTES / 2**30:.1f} GB)")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota, in CPUs, of the cgroup at ``root``: cgroup v2 ``cpu.max`` (``"max
    100000"`` = none), else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none)."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


def memory_available(root: Path = CGROUP, machine: int | None = None) -> int:
    """Bytes this process can still take: the machine's available memory (``machine``, or
    psutil's figure), or less when the cgroup's limit (v2 ``memory.max`` − ``memory.current``;
    v1 ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``) leaves less."""
    available = psutil.virtual_memory().available if machine is None else machine
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        limit, usage = _read(root / limit_file), _read(root / usage_file)
        if limit and limit.isdigit() and int(limit) < available:  # v1 "no limit" is huge
            available = min(available, max(0, int(limit) - int(usage or 0)))
    return available


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask; ``os.cpu_count()`` where none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_limit(root: Path = CGROUP, cpus: int | None = None) -> int:
    """CPUs' worth of compute this process may use: the affinity mask (or ``cpus``), or the
    CPU quota (rounded down, at least 1) when that is smaller."""
    quota = cpu_quota(root)
    cpus = usable_cpus() if cpus is None else cpus
    return cpus if quota is None else max(1, min(cpus, math.floor(quota)))


def auto_workers(root: Path = CGROUP, cpus: int | None = None,
                 available: int | None = None) -> Cores:
    """The default worker count: the smaller of usable CPUs, the CPU quota (rounded down,
    at least 1) and the workers memory holds; always at least 1."""
    cpus = usable_cpus() if cpus is None else cpus
    quota = cpu_quota(root)
    available = memory_available(root) if available is None else available
    by_memory = max(1, available // WORKER_BYTES)
    return Cores(max(1, min(cpu_limit(root, cpus), by_memory)), cpus, quota, int(by_memory))
