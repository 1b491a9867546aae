"""The machine a measurement ran on, in one line, for every report that quotes timings."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import psutil

PACKAGES = ("tensorflow", "keras", "keras-tuner", "optuna", "mlflow", "numpy")


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.processor() or "unknown CPU")


def describe(packages: tuple[str, ...] = PACKAGES) -> str:
    """``AMD EPYC, 2 cores, 24 GiB RAM; Linux-…; Python 3.11.7; tensorflow 2.21.0, …`` (the
    packages that are installed)."""
    versions = []
    for pkg in packages:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{_cpu()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; {platform.platform()}; "
            f"Python {platform.python_version()}; {', '.join(versions)}")
