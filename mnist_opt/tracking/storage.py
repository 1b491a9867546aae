"""Optuna storage: the default SQLite file, any URL, and heartbeats that catch killed trials.

A trial whose process died (``kill -9``, a closed laptop) stops sending heartbeats; the next
trial any worker starts marks it FAIL, closes its MLflow run and re-queues its parameters
(Optuna's ``fail_stale_trials`` + ``RetryHeartbeatStaleTrialCallback``).
"""
from __future__ import annotations

import os
import warnings

import optuna

from mnist_opt.study.config import studies_dir
from mnist_opt.errors import RetrainError, StorageError
from mnist_opt.tracking.urls import sqlite_init_lock

MAX_RETRY = 2  # a trial that keeps killing its worker is not retried forever


def default_storage() -> str:
    """One SQLite file under ``studies/`` holds every study (git-ignored)."""
    return f"sqlite:///{studies_dir() / 'optuna.db'}"


def resolve_storage(storage: str | None = None) -> str:
    return storage or os.environ.get("OPTUNA_STORAGE") or default_storage()


def _heartbeat() -> tuple[int, int]:
    """Seconds between heartbeats and before a silent trial counts as dead."""
    interval = int(os.environ.get("MNIST_OPT_HEARTBEAT", "10"))
    return interval, int(os.environ.get("MNIST_OPT_GRACE", str(3 * interval)))


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    from mnist_opt.tracking import runs as tracking  # MLflow is heavy; only needed once a trial died

    tracking.close_run(trial.user_attrs.get("mlflow_run_id"), "KILLED",
                       {"state": "failed", "fail_reason": "stale: worker stopped sending heartbeats"})
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An ``RDBStorage`` with heartbeats for database URLs; other URLs as Optuna takes them."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise StorageError(f"unsupported storage URL {url!r}: use sqlite:///path.db, "
                           "postgresql://user:password@host/db or mysql://…")
    interval, grace = _heartbeat()
    # SQLite: wait for a lock instead of failing at once when several workers write.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    try:
        with sqlite_init_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=grace,
                heartbeat_stale_trial_callback=_on_stale_trial)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds
        raise StorageError(f"cannot open Optuna storage {url!r}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]}") from exc


def load_existing(name: str, storage: str) -> optuna.Study:
    """The study ``name`` in ``storage``; a clear error (not a KeyError) when it is not there."""
    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage))
    except KeyError:
        raise RetrainError(f"no study {name!r} in {storage}; run `mnist-opt study {name}` "
                           "first") from None
