"""MLflow: one experiment per study, one parent run per invocation, one nested run per trial.

Autologging stays off: it opens and closes runs itself. Runs are opened *before* training
so per-epoch curves stream in, and closed with the status that matches the trial.
``mnist-opt compare`` adds one level above: its own run, with each repeat's study run
nested under it (:data:`PARENT_RUN_ENV`).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
import sys
import time
import traceback
from typing import Any, Iterator

import keras
import mlflow
import numpy as np
import optuna
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from mnist_opt.errors import TrackingError
from mnist_opt.tracking.serving import CHAMPION
from mnist_opt.tracking.urls import DEFAULT_DIR, sqlite_init_lock, sqlite_path, tracking_uri

INTERRUPTED = "interrupted"  # how an interrupted trial's fail_reason starts
AWAY = "tracking server unreachable"  # how the fail_reason of a trial that lost MLflow starts

# Given explicitly: letting MLflow infer requirements costs ~5 s per logged model.
PIP_REQUIREMENTS = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                    *([f"jax=={importlib.metadata.version('jax')}",
                       f"jaxlib=={importlib.metadata.version('jaxlib')}"]
                      if keras.backend.backend() == "jax" else [])]
# The id of an MLflow run to nest a study's parent run under. `mnist-opt compare` runs each
# repeat as a `mnist-opt study` subprocess and sets this to its own run's id: the study run
# then goes into that run's experiment (`compare-NAME`, not the study's own) with the tag
# `mlflow.parentRunId`, and the trial runs nest under the study run as always. Unset (the
# normal case): a top-level run in the experiment named after the study.
PARENT_RUN_ENV = "MNIST_OPT_PARENT_RUN"


class TrialLost(Exception):
    """This worker's trial was finished by another: failed as stale (its heartbeats stopped
    reaching the storage: a long database outage, a cut link) and its parameters queued
    again. Whatever this worker measured is dropped; the copy runs again as a new trial."""

    def __init__(self, number: int):
        super().__init__(f"trial {number} was failed as stale by another worker while this one "
                         "could not reach the storage: its result is dropped, its parameters "
                         "run again as a new trial")
        self.number = number


class TrackingAway(Exception):
    """The MLflow tracking server did not answer a trial's call, past MLflow's own retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, about 4 minutes at the defaults): the trial cannot
    be recorded, so it fails with ``fail_reason`` :data:`AWAY` and its parameters run again.
    ``run_id``: its MLflow run, if it was opened (to close KILLED once the server is back)."""

    def __init__(self, number: int, run_id: str | None, cause: BaseException):
        super().__init__(f"trial {number}: the MLflow tracking server did not answer "
                         f"({_cause(cause)}): the trial is dropped")
        self.number, self.run_id = number, run_id
        self.queued = self.counted = False  # set by the search loop that catches it


def unreachable(exc: BaseException | None) -> bool:
    """Whether ``exc`` means the tracking server could not be reached (refused, timed out, or
    answering only errors until MLflow's retries ran out, as it does while its database is
    down), not that it refused the request. A server that answers one request with errors
    for good (a broken artifact store) looks the same: its trials run again, each after
    MLflow's retries, and do not stop the study as failures would."""
    import requests
    from urllib3.exceptions import MaxRetryError

    away = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
            requests.exceptions.ChunkedEncodingError, MaxRetryError)
    return any(isinstance(err, away) for err in _chain(exc))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling, outermost first."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _cause(exc: BaseException) -> str:
    """The innermost error's type: ConnectionRefusedError, ReadTimeout, …"""
    return type(list(_chain(exc))[-1]).__name__


def wait_for_server(run_id: str | None, check=lambda: None) -> float:
    """Block until the tracking server answers again (each try is a request with MLflow's
    retries; pauses grow to 30 s between tries); the seconds waited. ``check()`` runs before
    each try (it raises to stop waiting: an interrupt)."""
    start, pause = time.monotonic(), 1.0
    _RetryNotice.waiting = True
    try:
        while True:
            check()
            # a short probe first: a try with MLflow's retries takes minutes, and an
            # interrupt waits for it
            if _answers_health():
                try:
                    client = MlflowClient()
                    client.get_run(run_id) if run_id else client.search_experiments(max_results=1)
                    return time.monotonic() - start
                except MlflowException as exc:
                    if not unreachable(exc):
                        return time.monotonic() - start
            time.sleep(pause)
            pause = min(2 * pause, 30.0)
    finally:
        _RetryNotice.waiting = False


def _answers_health() -> bool:
    """Whether the tracking server answers ``GET /health`` within 10 s (no retries; True for
    a tracking URI that is no server)."""
    import requests

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=10).ok
    except requests.RequestException:
        return False


def configure() -> str:
    """Honour ``MLFLOW_TRACKING_URI``; else a SQLite store in ``./mlruns`` (the registry needs a DB)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            DEFAULT_DIR.mkdir(exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store directory {DEFAULT_DIR.resolve()}: "
                                f"{exc.strerror}; fix it or set MLFLOW_TRACKING_URI") from exc
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # "Creating initial MLflow database tables..." on every new store tells a user nothing
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    connections = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryNotice) for h in connections.handlers):
        connections.addHandler(_RetryNotice())
    return uri


class _RetryNotice(logging.Handler):
    """One line when MLflow's client starts retrying a tracking server that does not answer.

    MLflow retries each request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, with
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, default 2: about 4 minutes; each attempt waits up
    to ``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s), and urllib3 notes each retry to a logger no
    one shows. Say it once per ``QUIET_S``, not once per retry, and with no traceback."""

    QUIET_S = 300.0
    waiting = False  # a worker that said it waits for the server does not repeat it

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._last = -self.QUIET_S

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("Retrying") or _RetryNotice.waiting or \
                time.monotonic() - self._last < self.QUIET_S:
            return
        self._last = time.monotonic()
        from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES as retries

        err = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
        print(f"MLflow tracking server not answering ({type(err).__name__}): its client retries "
              f"each request up to {retries.get()} times with back-off "
              "(MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR)",
              file=sys.stderr, flush=True)


def open_experiment(name: str, outer: bool = False) -> str:
    """Configure MLflow and open the study's experiment, before anything else is written
    (with ``outer``: the experiment of the run :data:`PARENT_RUN_ENV` names, when set)."""
    uri = configure()
    try:
        with sqlite_init_lock(uri):  # the first process creates the tables, the others wait
            run = outer_run() if outer else None
            return run[0] if run else experiment_id(name)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and MLflow raise many kinds
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''} — check the path and "
                            "its permissions, or set MLFLOW_TRACKING_URI") from exc


def _artifact_location(uri: str, name: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database file (``mlruns/<study>/…``)."""
    path = sqlite_path(uri)
    return (path.resolve().parent / name).as_uri() if path else None  # a tracking server decides


def experiment_id(name: str) -> str:
    """The study's experiment, created on first use; a concurrent creator wins (mlflow #4123)."""
    for attempt in range(3):
        try:
            client = MlflowClient()
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return client.create_experiment(
                name, artifact_location=_artifact_location(mlflow.get_tracking_uri(), name))
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def outer_run() -> tuple[str, str] | None:
    """``(experiment id, run id)`` of the run :data:`PARENT_RUN_ENV` names; None when unset."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"{PARENT_RUN_ENV}={run_id}: no such run in the MLflow tracking "
                            f"store {mlflow.get_tracking_uri()}; unset it") from exc
    return run.info.experiment_id, run.info.run_id


def _versions() -> dict[str, str]:
    """What produced a result: logged with every study run, for reproducibility."""
    import platform
    from importlib.metadata import version

    pkgs = ("mnist-opt", "tensorflow", "keras", "jax", "optuna", "mlflow", "numpy", "scikit-learn")
    return {"python": platform.python_version(), **{p: version(p) for p in pkgs}}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


@contextlib.contextmanager
def study_run(cfg, storage: str, extra: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one ``mnist-opt study`` invocation, holding the study's config.

    Ends FINISHED, KILLED on Ctrl-C / SIGTERM, FAILED on an error; never left RUNNING by a
    live process (a ``kill -9``ed one is closed by :func:`close_orphans` on the next start).
    Nested under the run :data:`PARENT_RUN_ENV` names, in its experiment, when that is set.
    """
    outer = outer_run()
    exp = outer[0] if outer else experiment_id(cfg.name)
    extra = {**extra, **{f"version.{pkg}": version for pkg, version in _versions().items()}}
    conf = cfg.model_dump(mode="json", exclude={"path", "digest", "space", "name", "description"})
    tags = {"mnist_opt.kind": "study", "optuna.study_name": cfg.name, "optuna.storage": storage,
            "mnist_opt.config_digest": cfg.digest, "mnist_opt.host": socket.gethostname(),
            "mnist_opt.pid": str(os.getpid())}
    when = time.strftime('%Y%m%d-%H%M%S')
    run = mlflow.start_run(experiment_id=exp, tags=tags, description=cfg.description,
                           run_name=f"{cfg.name}-{when}" if outer else f"study-{when}",
                           parent_run_id=outer[1] if outer else None)
    with _ended():
        mlflow.log_params({**_flatten("", conf, {}), **extra})
        if cfg.path:
            mlflow.log_artifact(str(cfg.path))
        yield run


@contextlib.contextmanager
def _ended() -> Iterator[None]:
    """End the active run FINISHED, KILLED on Ctrl-C / SIGTERM, FAILED on an error."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


@contextlib.contextmanager
def compare_run(name: str, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The run of one ``mnist-opt compare NAME`` invocation, in experiment ``compare-NAME``:
    the repeats' study runs nest under it (:data:`PARENT_RUN_ENV`). Ends like
    :func:`study_run`; runs of killed compare processes are closed first (KILLED)."""
    exp = experiment_id(f"compare-{name}")
    for run in MlflowClient().search_runs(
            [exp], "attributes.status = 'RUNNING' and tags.`mnist_opt.kind` = 'compare'"):
        if dead_here(run.data.tags):
            close_run(run.info.run_id, "KILLED", {"fail_reason": "process killed"})
    tags = {"mnist_opt.kind": "compare", "mnist_opt.compare": name,
            "mnist_opt.host": socket.gethostname(), "mnist_opt.pid": str(os.getpid())}
    run = mlflow.start_run(experiment_id=exp, tags=tags,
                           run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    with _ended():
        mlflow.log_params({**params, **{f"version.{pkg}": v for pkg, v in _versions().items()}})
        yield run


@contextlib.contextmanager
def trial_run(trial: optuna.Trial, params: dict[str, Any],
              parent: mlflow.entities.Run) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one trial; ends FINISHED, KILLED (pruned, interrupted) or FAILED.

    The parent is named explicitly, so worker processes nest under the invocation's run.
    The reason a trial did not complete goes to both sides: an MLflow tag and an Optuna
    user attribute (``prune_reason`` / ``fail_reason``, plus the traceback of an error).
    A tracking server that does not answer past MLflow's retries raises :class:`TrackingAway`
    (the reason on Optuna's side only: the server cannot take it).
    """
    try:
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                               parent_run_id=parent.info.run_id,
                               experiment_id=parent.info.experiment_id,
                               tags={"trial_number": str(trial.number), "state": "running",
                                     "mnist_opt.kind": "trial", "optuna.study_name":
                                     trial.study.study_name,
                                     "keras_backend": keras.backend.backend()})
    except MlflowException as exc:
        if unreachable(exc):
            raise _away(trial, None, exc) from exc
        raise
    start, state, status, away = time.monotonic(), "failed", "FAILED", None
    tags: dict[str, str] = {}  # the run's, sent with its end: one place that meets an outage
    try:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params(params)
        yield run
        # a write that fails when another worker failed the trial meanwhile: then the run
        # must not end FINISHED for a trial that Optuna counts as failed
        trial.set_user_attr("duration_s", round(time.monotonic() - start, 3))
        state, status = "complete", "FINISHED"
    except optuna.exceptions.UpdateFinishedTrialError:
        # the stale check closed the run KILLED already, unless it could not reach MLflow
        status = "KILLED"
        tags["fail_reason"] = "stale: failed by another worker (no heartbeat)"
        raise TrialLost(trial.number) from None
    except optuna.TrialPruned as exc:
        state, status = "pruned", "KILLED"
        tags["prune_reason"] = str(exc) or "pruner"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        tags.update(_record_failure(trial, f"{INTERRUPTED} (Ctrl-C or SIGTERM)", None))
        raise
    except Exception as exc:
        if unreachable(exc):  # nothing more reaches the server: say so on Optuna's side only
            try:
                away = _away(trial, run.info.run_id, exc)
            except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale meanwhile
                away = TrialLost(trial.number)
            raise away from exc
        tags.update(_record_failure(trial, f"{type(exc).__name__}: {exc}",
                                    traceback.format_exc()))
        raise
    finally:
        if away is not None:
            _forget_active_run(run.info.run_id)  # end_run would retry for minutes again
        else:
            try:
                mlflow.log_metric("duration_s", time.monotonic() - start)
                mlflow.set_tags({"state": state, **tags})
                mlflow.end_run(status)  # pops the run here before it asks the server
            except MlflowException as exc:
                _forget_active_run(run.info.run_id)
                if not unreachable(exc):
                    raise
                # a result the server cannot take is run again, never kept without its run;
                # a failed, lost or interrupted trial keeps its own error (its run stays
                # RUNNING until `mnist-opt study` closes the orphans of this host)
                if state in ("complete", "pruned"):
                    raise _away(trial, run.info.run_id, exc) from exc


def _away(trial: optuna.Trial, run_id: str | None, exc: BaseException) -> TrackingAway:
    trial.set_user_attr("fail_reason", f"{AWAY}: {_cause(exc)}")
    return TrackingAway(trial.number, run_id, exc)


def _forget_active_run(run_id: str) -> None:
    """Drop run ``run_id`` from this process's active runs without asking the server, if it
    is still the active one (``mlflow.end_run`` pops it before it calls the server)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()  # private: MLflow has no public local-only end
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()


def _record_failure(trial: optuna.Trial, reason: str, trace: str | None) -> dict[str, str]:
    """Record why ``trial`` failed on Optuna's side; the same for its MLflow run's tags."""
    trial.set_user_attr("fail_reason", reason[:2000])
    if trace:
        trial.set_user_attr("traceback", trace[-4000:])
    return {"fail_reason": reason[:5000], **({"traceback": trace[-5000:]} if trace else {})}


def close_run(run_id: str | None, status: str, tags: dict[str, str],
              ended: bool = False) -> bool:
    """End a run left RUNNING (its process died); False if there was nothing to close.
    ``ended``: also a run that already ended (re-closed with ``status``)."""
    if not run_id:
        return False
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status != "RUNNING" and not ended:
        return False
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_here(tags: dict[str, str]) -> bool:
    """A run whose process (tags ``mnist_opt.host``, ``mnist_opt.pid``) is gone from this host."""
    return (tags.get("mnist_opt.host") == socket.gethostname()
            and not _pid_alive(int(tags.get("mnist_opt.pid", "0") or 0)))


def close_orphans(study: optuna.Study, experiment_id: str) -> int:
    """Close runs that a killed process left RUNNING: trials Optuna already finished, and
    parent runs of dead processes on this host. Returns how many were closed.

    Only this study's runs: an experiment may hold several studies' (``compare``'s does);
    runs from before trial runs carried the study's name count as this study's.
    """
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in MlflowClient().search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if (tags.get("optuna.study_name", study.study_name) != study.study_name
                or tags.get("mnist_opt.kind") == "compare"):
            continue
        if tags.get("mnist_opt.kind") == "trial":
            state = states.get(int(tags.get("trial_number", -1)))
            if state is None or not state.is_finished():
                continue  # still running somewhere, or the heartbeat check will close it
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state.name, "KILLED")
            closed += close_run(run.info.run_id, status, {"state": state.name.lower()})
        elif dead_here(tags):
            closed += close_run(run.info.run_id, "KILLED", {"fail_reason": "process killed"})
    return closed


def portable(model: keras.Model) -> keras.Model:
    """``model``, or, when its optimizer is not one of Keras' own (the one-cycle optimizers
    of ``training.schedules``), an uncompiled copy with its weights: a logged model must load
    where only Keras is installed (``mlflow models serve``), and inference needs no optimizer.

    Told apart by the class's module: ``tracking`` may not import ``training`` (the layers)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or type(optimizer).__module__.startswith("keras."):
        return model
    copy = type(model).from_config(model.get_config())  # clone_model would compile it too
    copy.set_weights(model.get_weights())
    return copy


def log_model(model: keras.Model, registered_name: str | None = None):
    """Log ``model`` to the active run as an MLflow Keras model (and register it if named).

    The signature (28×28×1 float images in, 10 class probabilities out) lets the MLflow UI
    and ``mlflow.pyfunc`` users see what the model takes.
    """
    example = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    # A direct call, not predict(): predict traces a new tf.function for every model.
    signature = infer_signature(example, np.asarray(model(example, training=False)))
    return mlflow.keras.log_model(portable(model), name="model",
                                  pip_requirements=PIP_REQUIREMENTS, signature=signature,
                                  registered_model_name=registered_name)


def crown(name: str, version: str, test_accuracy: float) -> str:
    """Give ``version`` of registered model ``name`` the alias ``@champion`` unless the version
    holding it has a higher test accuracy (mean over seeds, a version tag); returns the
    version that holds it now."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "test_accuracy", f"{test_accuracy:.6f}")
    try:
        held = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        held = None
    if held is not None and str(held.version) != str(version) and \
            float(held.tags.get("test_accuracy", "-inf")) > test_accuracy:
        return str(held.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def log_best_so_far(parent_run_id: str, tolerance: float):
    """An Optuna callback: the parent run's ``best_value`` curve, one point per finished trial.

    With two objectives, ``best_value`` is the best first objective on the Pareto front, and
    ``pareto_front_size`` follows the front; the ``best_trial`` tag is the picked trial.
    """
    from mnist_opt.study.objectives import front_best, is_multi, pick

    client = MlflowClient()

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            chosen = pick(study, tolerance)
        except ValueError:  # no completed trial yet
            return
        try:
            if is_multi(study):
                best = front_best(study)
                client.log_metric(parent_run_id, "pareto_front_size", len(study.best_trials),
                                  step=trial.number)
            else:
                best = chosen.value
            client.log_metric(parent_run_id, "best_value", best, step=trial.number)
            client.set_tag(parent_run_id, "best_trial", str(chosen.number))
        except MlflowException as exc:  # the curve misses a point; the next trial's fills it
            if not unreachable(exc):
                raise

    return callback
