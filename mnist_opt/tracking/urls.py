"""Storage and tracking URLs: the one place that reads a SQLite URL's file path, the default
MLflow tracking store, and the lock that serialises opening a fresh SQLite database across
processes. Imports neither MLflow nor Optuna."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

SQLITE = "sqlite:///"
DEFAULT_DIR = Path("mlruns")  # the MLflow store's folder, relative to the working directory


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite database in ``./mlruns`` (the registry needs a
    database; MLflow's own default, ``./mlflow.db``, would scatter stores)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{DEFAULT_DIR.resolve() / 'mlflow.db'}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URL (Optuna's or MLflow's); None for others."""
    return Path(url[len(SQLITE):]) if url.startswith(SQLITE) else None


@contextlib.contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Serialize opening a SQLite database across processes on this machine.

    Two processes that open a *fresh* file at once race on creating its tables or running
    its migrations (Optuna: "table already exists"; MLflow: "duplicate column", mlflow
    #4123) and one dies. An advisory lock on ``<file>.lock`` makes the second one wait.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # an unwritable place: opening the database will say so clearly
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
