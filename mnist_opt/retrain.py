"""Retrain the best trial on train+validation, evaluate it on the held-out test set, register it."""
from __future__ import annotations

from dataclasses import dataclass

import keras
import mlflow
import optuna

from mnist_opt import data, tracking
from mnist_opt.callbacks import TrialCallback
from mnist_opt.config import StudyConfig
from mnist_opt.errors import RetrainError
from mnist_opt.models import build_model
from mnist_opt.space import suggest_params
from mnist_opt.storage import make_storage, resolve_storage
from mnist_opt.training import evaluate, train


@dataclass
class RetrainResult:
    trial_number: int
    val_accuracy: float
    test_accuracy: float
    test_loss: float
    run_id: str
    model_uri: str
    model_version: str | None


def best_trial(cfg: StudyConfig, storage: str) -> optuna.trial.FrozenTrial:
    try:
        study = optuna.load_study(study_name=cfg.name, storage=make_storage(storage))
    except KeyError:
        raise RetrainError(f"no study {cfg.name!r} in {storage}; run `mnist-opt study {cfg.name}` "
                           "first") from None
    try:
        return study.best_trial
    except ValueError:
        raise RetrainError(f"study {cfg.name!r} has no completed trial yet; run more trials "
                           f"with `mnist-opt study {cfg.name}`") from None


def retrain(cfg: StudyConfig, storage: str | None = None, verbose: bool = True) -> RetrainResult:
    """Rebuild the best trial's model from its params and train it on all training images.

    Search never saw the test set; this is the one place that reads it.
    """
    storage = resolve_storage(storage)
    best = best_trial(cfg, storage)
    val_accuracy = float(best.user_attrs.get("val_accuracy", best.value))
    params = suggest_params(optuna.trial.FixedTrial(best.params), cfg)
    ds = data.load(cfg.dataset)
    x, y = data.stratified_subset(ds.x_train, ds.y_train, cfg.data.train_subset, cfg.data.seed)
    exp = tracking.open_experiment(cfg.name)
    tags = {"mnist_opt.kind": "retrain", "source_trial": str(best.number),
            "source_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "optuna.study_name": cfg.name, "optuna.storage": storage}
    epochs = cfg.retrain_epochs
    with mlflow.start_run(experiment_id=exp, run_name=f"retrain-trial-{best.number}", tags=tags) as run:
        mlflow.log_params({**params, "epochs": epochs, "n_train": len(y)})
        keras.backend.clear_session()
        keras.utils.set_random_seed(cfg.search.seed)
        model = build_model(params)
        callback = TrialCallback(None, epochs=epochs, label="retrain", verbose=verbose)
        train(model, params, (data.to_float(x), y.astype("int64")), None, epochs, [callback],
              seed=cfg.search.seed)
        scores = evaluate(model, data.to_float(ds.x_test), ds.y_test.astype("int64"))
        mlflow.log_metrics({"test_loss": scores["loss"], "test_accuracy": scores["accuracy"],
                            "best_val_accuracy": val_accuracy})
        info = tracking.log_model(model, registered_name=cfg.name)
    return RetrainResult(best.number, val_accuracy, scores["accuracy"], scores["loss"],
                         run.info.run_id, info.model_uri,
                         str(info.registered_model_version) if info.registered_model_version else None)
