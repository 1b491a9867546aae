"""Per-epoch metrics go to MLflow in the background (MLflow's async logging), and a write
that fails still fails the training that made it: nothing is lost silently."""
from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_opt.tracking.metrics import BackgroundMetrics
from mnist_opt.training.callbacks import TrialCallback


def test_waited_metrics_are_all_in_the_run(stores):
    with mlflow.start_run() as run:
        metrics = BackgroundMetrics()
        for step in range(1, 6):
            metrics.log({"val_accuracy": step / 10, "epoch": step}, step=step)
        metrics.wait()
        history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(1, 6)]


def test_a_failed_background_write_is_raised_by_wait(stores):
    with mlflow.start_run() as run:
        pass
    MlflowClient().delete_run(run.info.run_id)  # the tracking store refuses its metrics now
    metrics = BackgroundMetrics(run_id=run.info.run_id)
    metrics.log({"val_accuracy": 0.5}, step=1)  # queued: the refusal comes in the background
    with pytest.raises(MlflowException, match="active"):
        metrics.wait()
    metrics.wait()  # what failed was reported once: nothing is left pending


def _tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_training_fails_when_its_curve_cannot_be_logged(stores):
    """The callback waits for its metrics when training ends: fit raises instead of
    returning a model whose run lacks its curves."""
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.arange(32) % 3
    client = MlflowClient()
    with mlflow.start_run() as run:
        _tiny_model().fit(x, y, epochs=2, verbose=0,
                          callbacks=[TrialCallback(None, epochs=2, verbose=False)])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == [1, 2]
        client.delete_run(run.info.run_id)  # a deleted run takes no more metrics
        with pytest.raises(MlflowException, match="async logging"):  # from the wait
            _tiny_model().fit(x, y, epochs=2, verbose=0,
                              callbacks=[TrialCallback(None, epochs=2, verbose=False)])
        client.restore_run(run.info.run_id)
