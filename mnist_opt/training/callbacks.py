"""The one Keras callback: per epoch it logs to MLflow, reports to Optuna and prunes."""
from __future__ import annotations

import math
import time

import keras
import mlflow
import optuna
from tqdm import tqdm

from mnist_opt import interrupt

LOGGED = ("loss", "accuracy", "val_loss", "val_accuracy")


class TrialCallback(keras.callbacks.Callback):
    """Streams ``loss``/``accuracy``/``val_*`` to the active MLflow run (step = epoch, from 1).

    With a trial, it also reports ``monitor`` to Optuna and raises ``optuna.TrialPruned`` as
    soon as the pruner says so or the loss is no longer finite. Unlike
    ``KerasPruningCallback`` it fails loudly when ``monitor`` is not among Keras's logs.
    """

    def __init__(self, trial: optuna.Trial | None = None, monitor: str = "val_accuracy",
                 epochs: int | None = None, label: str = "", verbose: bool = True,
                 report: bool = True):
        super().__init__()
        self.trial, self.monitor, self.epochs = trial, monitor, epochs
        self.label, self.verbose = label, verbose
        self.report = report  # False in two-objective studies: Optuna cannot prune those
        self.epoch_log: list[list] = []  # [unix time at the epoch's end, val_accuracy]

    def on_train_begin(self, logs: dict | None = None) -> None:
        interrupt.watch(self.model)

    def on_train_end(self, logs: dict | None = None) -> None:
        interrupt.watch(None)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        interrupt.check()  # an interrupted epoch is partial: not logged, not reported
        logs = logs or {}
        step = epoch + 1
        metrics = {k: float(logs[k]) for k in LOGGED if k in logs}
        mlflow.log_metrics(metrics, step=step)
        if self.verbose:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"{self.label} epoch {step}/{self.epochs or '?'}  {shown}".strip())
        if self.trial is None:
            return
        # when each epoch ended and its validation accuracy: best-so-far curves and time to
        # target over completed epochs, whatever the study's metric (`mnist-opt compare`)
        accuracy = logs.get("val_accuracy")
        self.epoch_log.append([time.time(), None if accuracy is None else float(accuracy)])
        self.trial.set_user_attr("epoch_log", self.epoch_log)
        if self.monitor not in logs:
            raise KeyError(f"metric {self.monitor!r} is not in Keras's logs {sorted(logs)}; "
                           "check the study file's search.metric")
        if not math.isfinite(metrics.get("loss", 0.0)) or not math.isfinite(logs[self.monitor]):
            reason = f"non-finite loss at epoch {step}"
            self.trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)
        if not self.report:
            return
        self.trial.report(float(logs[self.monitor]), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the pruner at epoch {step}")
