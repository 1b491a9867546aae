"""The one Keras callback: per epoch (or per fraction of one) it logs to MLflow, reports to
Optuna and prunes."""
from __future__ import annotations

import math
import time

import keras
import mlflow
import numpy as np
import optuna
from tqdm import tqdm

from mnist_opt import interrupt

LOGGED = ("loss", "accuracy", "val_loss", "val_accuracy")


class TrialCallback(keras.callbacks.Callback):
    """Streams ``loss``/``accuracy``/``val_*`` and ``epoch`` to the active MLflow run.

    With a trial, it also reports ``monitor`` to Optuna and raises ``optuna.TrialPruned`` as
    soon as the pruner says so or the loss is no longer finite. Unlike
    ``KerasPruningCallback`` it fails loudly when ``monitor`` is not among Keras's logs.
    The step, in MLflow and Optuna alike, counts reports: the epoch (from 1) here; with
    :class:`InEpochReports`, ``reports_per_epoch`` of them per epoch, the epoch's end being
    the last. The ``epoch`` metric keeps curves of either comparable.
    """

    reports_per_epoch = 1

    def __init__(self, trial: optuna.Trial | None = None, monitor: str = "val_accuracy",
                 epochs: float | None = None, label: str = "", verbose: bool = True,
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
        # a fractional max_epochs ends part-way through the last epoch (StopInEpoch)
        ended = min(epoch + 1, self.epochs or math.inf)
        step = round(ended * self.reports_per_epoch)
        metrics = {k: float(logs[k]) for k in LOGGED if k in logs}
        mlflow.log_metrics({**metrics, "epoch": ended}, step=step)
        if self.verbose:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"{self.label} epoch {ended:g}/{self.epochs or '?'}  {shown}".strip())
        # when each epoch ended and its validation accuracy: best-so-far curves and time to
        # target over completed epochs, whatever the study's metric (`mnist-opt compare`);
        # kept without a trial too, for search.promote's re-trainings
        accuracy = logs.get("val_accuracy")
        self.epoch_log.append([time.time(), None if accuracy is None else float(accuracy)])
        if self.trial is None:
            return
        self.trial.set_user_attr("epoch_log", self.epoch_log)
        if self.monitor not in logs:
            raise KeyError(f"metric {self.monitor!r} is not in Keras's logs {sorted(logs)}; "
                           "check the study file's search.metric")
        if not math.isfinite(metrics.get("loss", 0.0)):
            self._prune(ended, "non-finite loss")
        self._report(float(logs[self.monitor]), step, ended)

    def _report(self, value: float, step: int, epochs: float) -> None:
        """Tell Optuna ``value`` at ``step``, ``epochs`` into training; prune when it is not
        finite or the pruner says so."""
        if not math.isfinite(value):
            self._prune(epochs, "non-finite loss")
        if not self.report:
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            self._prune(epochs, "pruned by the pruner")

    def _prune(self, epochs: float, why: str) -> None:
        """Stop the trial as pruned, recording why and how far it trained (its fixed cost
        and epoch count need that when it stops inside an epoch)."""
        reason = f"{why} at epoch {round(epochs, 2):g}"
        self.trial.set_user_attr("prune_reason", reason)
        self.trial.set_user_attr("pruned_at_epoch", epochs)
        raise optuna.TrialPruned(reason)


class InEpochReports(TrialCallback):
    """A :class:`TrialCallback` that also reports ``reports_per_epoch - 1`` times inside each
    epoch, after each equal share of its batches, measured on a fixed validation slice.

    The full validation set is only measured at the epoch's end (Keras's own validation),
    and that is what Optuna receives at the epoch's last step and as the trial's value. In
    MLflow the in-epoch points are ``slice_val_accuracy``/``slice_val_loss`` with the epoch
    as a fraction. Keras calls batch hooks once per compiled call (``steps_per_execution``),
    so a report comes at the first call at or past its share, and says how far it got.
    """

    def __init__(self, trial: optuna.Trial, reports_per_epoch: int,
                 val_slice: tuple[np.ndarray, np.ndarray], **kwargs):
        super().__init__(trial, **kwargs)
        self.reports_per_epoch, self.val_slice = reports_per_epoch, val_slice
        self._epoch, self._next = 0, 1  # the epoch under way, its next report (1-based)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch, self._next = epoch, 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        steps = self.params["steps"]
        if steps is None:
            raise ValueError("in-epoch reports need a dataset of known length (tf.data "
                             "cardinality), to know where an epoch's quarters fall")
        done = min(batch + 1, steps)  # a last compiled call may run short of its length
        due = [i for i in range(self._next, self.reports_per_epoch)
               if done >= math.ceil(i * steps / self.reports_per_epoch)]
        if not due or self.model.stop_training:  # a stopped epoch's end reports it in full
            return
        self._next = due[-1] + 1
        step = self._epoch * self.reports_per_epoch + due[-1]
        epoch = self._epoch + done / steps
        if not math.isfinite((logs or {}).get("loss", 0.0)):  # NaN outputs still "classify"
            self._prune(epoch, "non-finite loss")
        metrics = self.slice_metrics()
        mlflow.log_metrics({**{f"slice_{k}": v for k, v in metrics.items()}, "epoch": epoch},
                           step=step)
        self._report(metrics[self.monitor], step, epoch)

    def slice_metrics(self, batch_size: int = 512) -> dict[str, float]:
        """Validation accuracy and loss on the slice, in inference mode, outside Keras's
        metrics (``evaluate`` would reset the epoch's running training metrics)."""
        x, y = self.val_slice
        probs = np.concatenate([keras.ops.convert_to_numpy(self.model(x[i:i + batch_size],
                                                                      training=False))
                                for i in range(0, len(y), batch_size)])
        # Keras computes the loss from the softmax's logits; clipping only differs below 1e-7.
        # Under label smoothing the loss is the smoothed one, as Keras' at the epoch's end.
        smoothing = getattr(self.model.loss, "label_smoothing", 0.0)
        target = np.full(probs.shape, smoothing / probs.shape[1])
        target[np.arange(len(y)), y] += 1 - smoothing
        loss = -np.mean(np.sum(target * np.log(np.clip(probs, 1e-7, 1.0)), axis=1))
        return {"val_accuracy": float(np.mean(probs.argmax(axis=1) == y)),
                "val_loss": float(loss)}


class StopInEpoch(keras.callbacks.Callback):
    """Ends training ``epochs`` (a fraction: 2.5) into it: Keras then measures validation and
    calls ``on_epoch_end`` for the part-epoch, as for a whole one. Placed before the other
    callbacks, so that they see ``stop_training`` in the same batch hook. Batch hooks come
    once per compiled call (``steps_per_execution``), so it stops at the first call at or
    past its share, as the in-epoch reports do."""

    def __init__(self, epochs: float):
        super().__init__()
        self.last, self.share = math.floor(epochs), epochs - math.floor(epochs)
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        steps = self.params["steps"]
        if self._epoch == self.last and steps and batch + 1 >= math.ceil(self.share * steps):
            self.model.stop_training = True
