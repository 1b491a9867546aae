"""MLflow: one experiment per study, one parent run per invocation, one nested run per trial.

Autologging stays off: it opens and closes runs itself. Runs are opened *before* training
so per-epoch curves stream in, and closed with the status that matches the trial.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import keras
import mlflow
import numpy as np
import optuna
import tensorflow as tf
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

DEFAULT_DIR = Path("mlruns")
# Given explicitly: letting MLflow infer requirements costs ~5 s per logged model.
PIP_REQUIREMENTS = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
TRIAL_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def configure() -> str:
    """Honour ``MLFLOW_TRACKING_URI``; else a SQLite store in ``./mlruns`` (the registry needs a DB)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        DEFAULT_DIR.mkdir(exist_ok=True)
        uri = f"sqlite:///{DEFAULT_DIR.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def _artifact_location(uri: str, name: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database file (``mlruns/<study>/…``)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / name).as_uri()
    return None  # a tracking server decides


def experiment_id(name: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(
        name, artifact_location=_artifact_location(mlflow.get_tracking_uri(), name))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


@contextlib.contextmanager
def study_run(cfg, storage: str, extra: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one ``mnist-opt study`` invocation, holding the study's config."""
    exp = experiment_id(cfg.name)
    conf = cfg.model_dump(mode="json", exclude={"path", "digest", "space", "name", "description"})
    tags = {"mnist_opt.kind": "study", "optuna.study_name": cfg.name, "optuna.storage": storage,
            "mnist_opt.config_digest": cfg.digest}
    with mlflow.start_run(experiment_id=exp, run_name=f"study-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags=tags, description=cfg.description) as run:
        mlflow.log_params({**_flatten("", conf, {}), **extra})
        if cfg.path:
            mlflow.log_artifact(str(cfg.path))
        yield run


@contextlib.contextmanager
def trial_run(trial: optuna.Trial, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one trial; ends FINISHED, KILLED (pruned) or FAILED with a ``state`` tag."""
    parent = mlflow.active_run()
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                           experiment_id=parent.info.experiment_id if parent else None,
                           tags={"trial_number": str(trial.number), "state": "running",
                                 "mnist_opt.kind": "trial"})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    mlflow.log_params(params)
    start, state = time.monotonic(), "failed"
    try:
        yield run
        state = "complete"
    except optuna.TrialPruned as exc:
        state = "pruned"
        mlflow.set_tag("prune_reason", str(exc) or "pruner")
        raise
    except BaseException as exc:
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.set_tag("traceback", traceback.format_exc()[-5000:])
        raise
    finally:
        mlflow.log_metric("duration_s", time.monotonic() - start)
        mlflow.set_tag("state", state)
        mlflow.end_run(TRIAL_STATUS[state])


def log_model(model: keras.Model, registered_name: str | None = None):
    """Log ``model`` to the active run as an MLflow Keras model (and register it if named).

    The signature (28×28×1 float images in, 10 class probabilities out) lets the MLflow UI
    and ``mlflow.pyfunc`` users see what the model takes.
    """
    example = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    signature = infer_signature(example, model.predict(example, verbose=0))
    return mlflow.keras.log_model(model, name="model", pip_requirements=PIP_REQUIREMENTS,
                                  signature=signature, registered_model_name=registered_name)


def log_best_so_far(parent_run_id: str):
    """An Optuna callback: the parent run's ``best_value`` curve, one point per finished trial."""
    client = MlflowClient()

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            best = study.best_value
        except ValueError:  # no completed trial yet
            return
        client.log_metric(parent_run_id, "best_value", best, step=trial.number)
        client.set_tag(parent_run_id, "best_trial", str(study.best_trial.number))

    return callback
