"""``--workers auto``: one worker per core the process may use, as far as memory allows —
from planted cgroup files (v1 and v2), an affinity mask and an amount of available memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mnist_opt.search.cores import (WORKER_BYTES, auto_workers, cpu_limit, cpu_quota,
                                    memory_available, usable_cpus)

GB = 2**30
ROOT = Path(__file__).resolve().parent.parent


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize("files, quota", [
    ({}, None),
    ({"cpu.max": "max 100000"}, None),
    ({"cpu.max": "150000 100000"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
])
def test_cpu_quota_from_cgroup_v1_and_v2(tmp_path, files, quota):
    assert cpu_quota(_plant(tmp_path, files)) == quota


def test_one_allowed_core_gives_one_worker(tmp_path):
    cores = auto_workers(tmp_path, cpus=1, available=64 * GB)
    assert cores.workers == 1 and "1 usable CPUs" in cores.describe()


def test_two_cores_give_two_workers(tmp_path):
    assert auto_workers(tmp_path, cpus=2, available=64 * GB).workers == 2


def test_the_cpu_quota_caps_the_cores(tmp_path):
    root = _plant(tmp_path, {"cpu.max": "150000 100000"})
    cores = auto_workers(root, cpus=8, available=64 * GB)
    assert cores.workers == 1 and "CPU quota 1.5 CPUs" in cores.describe()


def test_a_small_memory_limit_gives_fewer_workers(tmp_path):
    # a cgroup v2 limit of 6 GB with 1 GB used: room for 2 workers of 2.5 GB on 8 cores
    root = _plant(tmp_path, {"memory.max": str(6 * GB), "memory.current": str(1 * GB)})
    assert memory_available(root, machine=64 * GB) == 5 * GB
    cores = auto_workers(root, cpus=8, available=memory_available(root, machine=64 * GB))
    assert cores.workers == 5 * GB // WORKER_BYTES == 2 and cores.memory_workers == 2
    # v1, and less than one worker's worth: still one worker
    tight = _plant(tmp_path / "v1", {"memory/memory.limit_in_bytes": str(GB),
                                     "memory/memory.usage_in_bytes": str(GB // 2)})
    assert auto_workers(tight, cpus=8).workers == 1


def test_workers_must_be_a_number_or_auto():
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "study", "mlp_tpe", "-w", "many"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "neither a number of worker processes nor 'auto'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "study", "mlp_tpe", "-w", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--workers must be a positive integer" in proc.stderr


def test_worker_threads_share_the_quota_not_the_hosts_cores(tmp_path):
    """Workers get cpu_limit() // workers threads: under a 1.5-CPU quota that is 1 CPU's
    worth, however many cores the host has."""
    assert cpu_limit(_plant(tmp_path, {"cpu.max": "150000 100000"})) == 1
    assert cpu_limit(_plant(tmp_path / "none", {"cpu.max": "max 100000"})) == usable_cpus()
