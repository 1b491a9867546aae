"""The machine a measurement ran on, in one line, for every report that quotes timings, and
the code it ran."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
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


def code_version() -> str:
    """``git 1a2b3c4`` (``+ changes`` when the package's files differ from that commit) for a
    git checkout of mnist_opt, else the package's version: which code a measurement ran."""
    import mnist_opt

    package = Path(mnist_opt.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(package), "status", "--porcelain",
                                  "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        commit = None
    if commit is None or commit.returncode:
        return f"mnist_opt {mnist_opt.__version__}"
    return f"git {commit.stdout.strip()}{' + changes' if changed.stdout.strip() else ''}"
