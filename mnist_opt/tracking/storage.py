"""Optuna storage: the default SQLite file, any URL, and heartbeats that catch killed trials.

A trial whose process died (``kill -9``, a closed laptop) stops sending heartbeats; the next
trial any worker starts marks it FAIL, closes its MLflow run and re-queues its parameters
(Optuna's ``fail_stale_trials`` + ``RetryHeartbeatStaleTrialCallback``). On the trial's own
host there is no need to wait for the grace period: each trial records its owner process,
and :func:`fail_dead_owners` fails a RUNNING trial whose owner is gone at once, the same way.
Either way the trial's ``fail_reason`` starts with ``stale``, so a dead worker is not
counted as a trial that failed (``search.max_consecutive_failures``).

A database server that restarts, or a link that drops for a while, is ridden out: every
storage call that loses its connection is retried with bounded back-off for up to
``MNIST_OPT_DB_RETRY`` seconds (default 120), reported in two lines per outage (lost, back),
and the heartbeat thread outlives an outage longer than that. Pooled connections are
checked before use (SQLAlchemy's ``pool_pre_ping``), and PostgreSQL connections time out
(``connect_timeout``, ``tcp_user_timeout``) instead of hanging on a dead link for minutes.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import socket
import sys
import threading
import time
import warnings
from typing import Callable, Iterator

import optuna
import psutil

from mnist_opt.study.config import studies_dir
from mnist_opt.errors import RetrainError, StorageError
from mnist_opt.tracking.urls import sqlite_init_lock, sqlite_path

MAX_RETRY = 2  # a trial that keeps killing its worker is not retried forever
STALE = "stale"  # how a stale trial's fail_reason starts
_NO_HEARTBEAT = f"{STALE}: no heartbeat"
OWNER = ("host", "pid", "pid_started")  # user attrs: who runs the trial
# What a re-queued trial must not inherit from the dead one: its owner would look dead at
# once, its failure would stick to a trial that then completes, and what it measured before
# it was cut (epochs count towards search.epoch_budget) belongs to it alone.
_NOT_INHERITED = (*OWNER, "fail_reason", "traceback", "mlflow_run_id", "epoch_log", "epochs",
                  "pruned_at_epoch", "prune_reason", "val_accuracy", "rss_mb", "duration_s",
                  "n_params")


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
    """A trial failed as stale: close its MLflow run, queue its parameters again."""
    from mnist_opt.tracking import runs as tracking  # MLflow is heavy; only needed once a trial died

    reason = trial.user_attrs.get("fail_reason", f"{STALE}: worker stopped sending heartbeats")
    if reason.startswith(_NO_HEARTBEAT):  # (search.slots.fail_stale reports a dead owner)
        print(f"trial {trial.number} failed as {reason}: its MLflow run closed, its parameters "
              "queued again", flush=True)
    tracking.close_run(trial.user_attrs.get("mlflow_run_id"), "KILLED",
                       {"state": "failed", "fail_reason": reason})
    requeue(study, trial)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue ``trial``'s parameters again, at most :data:`MAX_RETRY` times for one
    configuration (Optuna's retry callback: the copy's ``failed_trial`` system attribute
    names the first trial, ``retry_history`` each one since); whether it was queued."""
    with warnings.catch_warnings():  # experimental since 2.8, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    retry(study, _without(trial, _NOT_INHERITED))
    return len(trial.system_attrs.get("retry_history", [])) < MAX_RETRY  # the callback's rule


def _without(trial: optuna.trial.FrozenTrial, keys: tuple[str, ...]) -> optuna.trial.FrozenTrial:
    out = copy.deepcopy(trial)  # the retry callback appends to the system attrs' retry_history
    out.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in keys}
    return out


def _mark_stale(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Say why before the trial is failed (a finished trial's attributes are read-only)."""
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished, or another process failed it first
    return True


class _Storage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose heartbeat-stale trials carry ``fail_reason: stale: …``.

    Optuna fails stale trials inside ``optimize`` (``fail_stale_trials``), after asking the
    storage which they are: the one moment they are still RUNNING and can be marked. (A
    private method of the pinned Optuna; tests/test_resume.py checks the mark.)
    """

    retry_seconds = 0.0  # make_storage sets it for database servers (not SQLite files)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        reason = f"{_NO_HEARTBEAT} for {self.grace_period} s (worker killed, hung or cut off)"
        return [i for i in super()._get_stale_trial_ids(study_id) if _mark_stale(self, i, reason)]

    # A trial records its owner the moment it becomes RUNNING in this process — created by
    # study.ask(), or a queued one taken — not when the objective starts: a process killed
    # while the sampler works (GP sampling takes seconds) leaves no ownerless RUNNING trial.
    # (Optuna's cached storage creates trials through the private _create_new_trial.)

    def _create_new_trial(self, study_id: int, template_trial=None):
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == optuna.trial.TrialState.RUNNING:
            trial.user_attrs.update(self._own(trial._trial_id))
        return trial

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == optuna.trial.TrialState.RUNNING:  # a queued trial, taken
            self._own(trial_id)
        return changed

    def _own(self, trial_id: int) -> dict:
        owner = owner_attrs()
        for key, value in owner.items():
            self.set_trial_user_attr(trial_id, key, value)
        return owner

    def record_heartbeat(self, trial_id: int) -> None:
        """Optuna's heartbeat thread dies on the first error it meets, and its trial then
        looks dead to every worker: an outage longer than the retries skips beats instead
        (the outage is already reported)."""
        try:
            retrying(super().record_heartbeat, self.retry_seconds, trial_id)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds
            if not lost_connection(exc):
                raise


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions that caused it (at most 10: a chain, not a cycle)."""
    for _ in range(10):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def lost_connection(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception that caused it, says the database could not be reached
    (server down or restarting, link cut): SQLAlchemy's ``OperationalError`` /
    ``InterfaceError``, also inside Optuna's ``StorageInternalError``."""
    import sqlalchemy.exc

    return any(isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
               or getattr(e, "connection_invalidated", False) for e in _causes(exc))


class _Outage:
    """The database outage this process is in, if any: reported once when a call first
    fails and once when one succeeds again, however many threads and calls meet it."""

    def __init__(self) -> None:
        self._lock, self.since = threading.Lock(), None

    def failed(self, exc: BaseException, limit: float) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                cause = exc.__cause__ or exc
                print(f"database unreachable ({type(cause).__name__}: "
                      f"{str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ''}): "
                      f"retrying for up to {limit:g} s", file=sys.stderr, flush=True)

    def back(self) -> None:
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.since is not None:
                print(f"database reachable again after {time.monotonic() - self.since:.0f} s",
                      file=sys.stderr, flush=True)
                self.since = None


_OUTAGE = _Outage()


def retrying(call, limit: float, *args, when: Callable[[BaseException], bool] = lost_connection,
             **kwargs):
    """``call(*args, **kwargs)``, again after 0.5, 1, 2, 4, 5, 5, … s while it fails for a lost
    connection (or as ``when`` says), for up to ``limit`` s; then its error."""
    deadline, delay = None, 0.5
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lost connection
            if limit <= 0 or not when(exc):
                raise
            now = time.monotonic()
            deadline = deadline or now + limit
            if now >= deadline:
                print(f"database still unreachable after {limit:g} s: giving up",
                      file=sys.stderr, flush=True)
                raise
            _OUTAGE.failed(exc, limit)
            time.sleep(min(delay, deadline - now))
            delay = min(2 * delay, 5.0)
            continue
        _OUTAGE.back()
        return result


def _retried(method):
    def call(self, *args, **kwargs):
        return retrying(method, self.retry_seconds, self, *args, **kwargs)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


# Every backend call of Optuna's cached storage (optuna/storages/_cached_storage.py), so that
# a lost connection is retried whichever call meets it; our own overrides included. A write
# whose connection is lost after the server committed it is applied again (a trial created
# twice, or UpdateFinishedTrialError when it finished a trial): possible, but only when the
# connection dies in that instant.
for _name in ("_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials",
              "_set_trial_param", "create_new_study", "delete_study", "get_all_studies",
              "get_study_directions", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_system_attrs", "get_study_user_attrs", "get_trial",
              "get_trial_id_from_study_id_trial_number",
              "set_study_system_attr", "set_study_user_attr", "set_trial_intermediate_value",
              "set_trial_state_values", "set_trial_system_attr", "set_trial_user_attr",
              "get_all_trials", "get_n_trials", "get_trial_params", "get_trial_user_attrs"):
    setattr(_Storage, _name, _retried(getattr(_Storage, _name)))


def owner_attrs(pid: int | None = None) -> dict:
    """Which host and process run a trial (this process, or ``pid``); the process's start
    time tells a reused pid from the owner."""
    proc = psutil.Process(pid)
    return dict(zip(OWNER, (socket.gethostname(), proc.pid, proc.create_time())))


def owner_gone(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial's owner is a process of this host that no longer runs.

    False for other hosts (their heartbeats decide) and for trials with no owner recorded.
    """
    return process_gone(trial.user_attrs)


def process_gone(attrs: dict) -> bool:
    """True when the process :func:`owner_attrs` described in ``attrs`` is of this host and
    no longer runs; False for other hosts and for ``attrs`` without a pid."""
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return False
    try:
        proc = psutil.Process(attrs["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
            return True
        return abs(proc.create_time() - attrs.get("pid_started", 0.0)) > 0.05  # pid reused
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # another user's live process
        return False


def fail_dead_owners(study: optuna.Study) -> list[int]:
    """Fail this host's RUNNING trials whose process is gone, as a stale trial is failed
    (MLflow run closed, parameters re-queued), without waiting for the heartbeat grace period.
    Returns their numbers."""
    storage, failed = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not owner_gone(trial):
            continue
        reason = f"{STALE}: process {trial.user_attrs['pid']} on {trial.user_attrs['host']} is gone"
        if not _mark_stale(storage, trial._trial_id, reason):
            continue
        try:  # as optuna.storages.fail_stale_trials does
            if not storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        _on_stale_trial(study, storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An ``RDBStorage`` with heartbeats for database URLs; other URLs as Optuna takes them."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise StorageError(f"unsupported storage URL {url!r}: use sqlite:///path.db, "
                           "postgresql://user@host/db (the password in ~/.pgpass) or mysql://…")
    interval, grace = _heartbeat()
    # SQLite: wait for a lock instead of failing at once when several workers write.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else _server_engine(url)

    def open_() -> _Storage:
        if (path := sqlite_path(url)) is not None:  # as MLflow does for its SQLite store
            path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite_init_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return _Storage(url, engine_kwargs=engine, heartbeat_interval=interval,
                            grace_period=grace, heartbeat_stale_trial_callback=_on_stale_trial)

    for attempt in range(_OPEN_ATTEMPTS):
        try:
            # a full server is a wait (as a lost connection is for calls); a server that does
            # not answer at all is more likely a wrong URL: that fails at once
            storage = retrying(open_, _retry_seconds(), when=_no_free_slot)
            if not url.startswith("sqlite:"):  # a file does not go away; a server may
                storage.retry_seconds = _retry_seconds()
            return storage
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds
            if attempt + 1 < _OPEN_ATTEMPTS and _lost_creation_race(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(f"cannot open Optuna storage {url!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0]}") from exc
    raise AssertionError("unreachable")


def _retry_seconds() -> float:
    """How long a storage call retries a lost connection (``MNIST_OPT_DB_RETRY``, s)."""
    return float(os.environ.get("MNIST_OPT_DB_RETRY", "120"))


def _server_engine(url: str) -> dict:
    """SQLAlchemy engine options for a database server: test a pooled connection before
    using it (after a restart every pooled one is dead); PostgreSQL: give up connecting after
    10 s and on a connection whose data stays unacknowledged for 20 s (a cut link), where
    the kernel's defaults wait 2 and 15 minutes. Options given in the URL win."""
    engine: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        given = url.partition("?")[2]
        engine["connect_args"] = {key: value for key, value in
                                  {"connect_timeout": 10, "tcp_user_timeout": 20000}.items()
                                  if f"{key}=" not in given}
    return engine


# Workers on several machines that open a fresh database server's storage at once race on
# creating Optuna's tables (PostgreSQL: `relation "studies" already exists`; the version row:
# a duplicate key), and no file lock spans machines. The loser finds the tables made when it
# opens the storage again.
_OPEN_ATTEMPTS = 4


def _no_free_slot(exc: BaseException | None) -> bool:
    """Whether the database server refused a connection because every one it allows is taken
    (PostgreSQL's ``too many clients already`` or ``remaining connection slots are reserved``,
    SQLSTATE 53300; MySQL's ``Too many connections``): many workers starting at once."""
    return any(getattr(e, "sqlstate", None) == "53300" or
               any(words in str(e).lower() for words in
                   ("too many clients", "remaining connection slots", "too many connections"))
               for e in _causes(exc))


def _lost_creation_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text


class StudyLock:
    """A lock on one study that every worker of every host takes, held while a worker counts
    the study's trials and asks for its next one (:mod:`mnist_opt.search.slots`).

    PostgreSQL: a session advisory lock on a connection of its own; MySQL: ``GET_LOCK``. The
    server drops either when the holder's connection closes, so a worker killed while holding
    it does not block the others. SQLite serves one machine: ``flock`` on
    ``<file>.trials.lock``, which the kernel drops when the holder dies. An in-memory database
    lives in one process, which runs one trial at a time: no lock.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.name = url, study_name
        digest = hashlib.sha256(f"mnist_opt:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # pg: a bigint key
        self._held: object | None = None

    def acquire(self) -> None:
        if self._held is not None:
            return
        path = sqlite_path(self.url)
        if path is not None and path.name != ":memory:":
            handle = open(path.with_name(path.name + ".trials.lock"), "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle
        elif self.url.startswith(("postgresql", "mysql")):
            self._held = retrying(self._server_lock, _retry_seconds())
        else:
            self._held = True

    def _server_lock(self):
        """A new connection that holds the lock (a lost one is retried whole, by
        :meth:`acquire`: the server dropped the lock with it)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args=_server_engine(self.url).get("connect_args", {}))
        try:
            conn = engine.connect()
            sql = ("SELECT pg_advisory_lock(:key)" if self.url.startswith("postgresql")
                   else "SELECT GET_LOCK(:key, -1)")
            conn.execute(sqlalchemy.text(sql), {"key": self._key})
            conn.commit()  # a session lock: it outlives the transaction that took it
        except BaseException:
            engine.dispose()
            raise
        return conn

    def release(self) -> None:
        """Idempotent: releasing a lock not held does nothing."""
        held, self._held = self._held, None
        if held is None or held is True:
            return
        if hasattr(held, "fileno"):
            held.close()  # closing the file drops its flock
            return
        try:  # closing the connection drops the lock too; unlocking first says so at once
            import sqlalchemy

            sql = ("SELECT pg_advisory_unlock(:key)" if self.url.startswith("postgresql")
                   else "SELECT RELEASE_LOCK(:key)")
            held.execute(sqlalchemy.text(sql), {"key": self._key})
        except Exception:  # noqa: BLE001 - the server went away: it dropped the lock with us
            pass
        finally:
            held.close()
            held.engine.dispose()


def load_existing(name: str, storage: str) -> optuna.Study:
    """The study ``name`` in ``storage``; a clear error (not a KeyError) when it is not there."""
    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage))
    except KeyError:
        raise RetrainError(f"no study {name!r} in {storage}; run `mnist-opt study {name}` "
                           "first") from None
