"""One ``mnist-opt compare`` repeat run by keras-tuner, recorded like our own repeats.

    python -m mnist_opt.search.kt_repeat STUDY_FILE --storage URL --tuner kt-random

keras-tuner searches the study file's space (``suggest_params`` through
:class:`KerasTunerTrial`) on its data (``study_split``) with our model builder and training
pipeline (``fresh_model``, ``compile_model``, ``make_dataset``): the tuner's
``max_epochs``/``epochs`` is the study's ``training.max_epochs``, its seed the repeat's,
BayesianOptimization's ``num_initial_points`` the study's ``search.n_startup_trials``, its
objective ``val_accuracy``. It runs in one process (keras-tuner has no local parallel mode),
in a temporary directory, under the study file's budget, checked as each trial ends as our
runner checks it: no new trial after ``search.timeout`` seconds of search, or once the
trials together completed ``search.epoch_budget`` epochs; a running trial finishes.

Every epoch is recorded as it ends (``time.time()``, ``val_accuracy``), and every keras-tuner
trial, as it ends, is added to the repeat's Optuna study (created by ``compare``) as a
finished trial: its hyperparameters with the distributions of the study's space, its best
validation accuracy as the value (keras-tuner's score), and ``epoch_log``/``epochs`` user
attrs, so that :mod:`mnist_opt.reporting.time_to_target` treats both tools alike and a killed
process keeps the trials it finished. The repeat has its own MLflow run, as ours do (nested
under the compare run, the curve logged when the search ends).

``--defaults`` runs keras-tuner as its documentation starts a user instead: ``model.fit`` on
the NumPy arrays with one step per compiled call, and the tuner's own
``hyperband_iterations`` and ``num_initial_points``.

Light at the top: TensorFlow, keras-tuner and Optuna are imported inside :func:`main`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from mnist_opt.study.config import StudyConfig


class KerasTunerTrial:
    """Lets ``space.suggest_params`` define the same space for keras-tuner's ``hp``, and
    records each parameter's Optuna distribution (only those this configuration has)."""

    def __init__(self, hp: Any):
        self.hp = hp
        self.distributions: dict[str, Any] = {}

    def suggest_float(self, name, low, high, step=None, log=False):
        from optuna.distributions import FloatDistribution

        self.distributions[name] = FloatDistribution(low, high, log=log, step=step)
        return self.hp.Float(name, low, high, step=step, sampling="log" if log else "linear")

    def suggest_int(self, name, low, high, step=1, log=False):
        from optuna.distributions import IntDistribution

        self.distributions[name] = IntDistribution(low, high, log=log, step=step)
        # keras-tuner multiplies by `step` between log-sampled values: none for log
        return self.hp.Int(name, low, high, step=None if log else step,
                           sampling="log" if log else "linear")

    def suggest_categorical(self, name, choices):
        from optuna.distributions import CategoricalDistribution

        self.distributions[name] = CategoricalDistribution(list(choices))
        return self.hp.Choice(name, list(choices))


class _Budget:
    """The repeat's budget, kept across keras-tuner trials (it deep-copies the callbacks it is
    given, so this lives in our hypermodel, not in a callback of ``search``)."""

    def __init__(self, cfg: StudyConfig):
        self.seconds = cfg.search.timeout
        self.epochs = cfg.search.epoch_budget
        self.trials = cfg.search.n_trials  # compare's trial budget (else a count never reached)
        self.start = time.time()
        self.done = 0  # epochs completed, all trials together
        self.ended = 0  # trials ended, as keras-tuner counts them

    def spent(self) -> bool:
        return ((self.seconds is not None and time.time() - self.start >= self.seconds)
                or (self.epochs is not None and self.done >= self.epochs)
                or self.ended >= self.trials)


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def _tuner(name: str, cfg: StudyConfig, study, hypermodel, budget: _Budget, seed: int,
           directory: str, defaults: bool = False):
    """keras-tuner's tuner ``name`` (``kt-random``), adding each trial to ``study`` as it
    ends and starting none once ``budget`` is spent; with ``defaults``, keras-tuner's own
    ``hyperband_iterations`` and ``num_initial_points``."""
    import keras_tuner as kt
    import optuna

    from mnist_opt.search.strategies import KT_TUNERS, N_TRIALS

    base = getattr(kt, KT_TUNERS[name])

    class Tuner(base):
        def on_trial_begin(self, trial):
            super().on_trial_begin(trial)
            hypermodel.begin(trial.trial_id)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            record = hypermodel.end()
            budget.ended += 1
            log = record["epoch_log"]
            best = max((a for _, a in log if a is not None), default=None)
            ok = trial.status == "COMPLETED" and best is not None
            tuner_values = {k[len("tuner/"):]: v for k, v in trial.hyperparameters.values.items()
                            if k.startswith("tuner/")}
            frozen = optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                value=best if ok else None, params=record["params"],
                distributions=record["distributions"],
                user_attrs={"epoch_log": log, "epochs": len(log), "kt_trial_id": trial.trial_id,
                            "kt_status": str(trial.status),
                            **({"kt_hyperband": tuner_values} if tuner_values else {})})
            frozen.datetime_start = datetime.datetime.fromtimestamp(record["start"])
            frozen.datetime_complete = datetime.datetime.fromtimestamp(time.time())
            study.add_trial(frozen)
            print(f"trial {trial.trial_id}: {trial.status}, {len(log)} epochs, best val_accuracy "
                  f"{best if best is None else round(best, 4)}; {budget.done} epochs, "
                  f"{time.time() - budget.start:.1f} s in all", flush=True)
            if budget.spent():  # no new trial: the next create_trial answers STOPPED
                self.oracle.max_trials = len(self.oracle.trials)

    common = dict(objective="val_accuracy", seed=seed, directory=directory,
                  project_name=name, overwrite=True, max_consecutive_failed_trials=3)
    if name == "kt-hyperband":
        # as many Hyperband iterations as the budget allows (None: no limit of its own)
        return Tuner(hypermodel, max_epochs=cfg.training.max_epochs,
                     factor=cfg.search.reduction_factor,
                     **({} if defaults else {"hyperband_iterations": None}), **common)
    extra = ({"num_initial_points": max(1, cfg.search.n_startup_trials)}
             if name == "kt-bayesian" and not defaults else {})
    return Tuner(hypermodel, max_trials=N_TRIALS, **extra, **common)


def _hypermodel(cfg: StudyConfig, n_train: int, budget: _Budget, seed: int,
                defaults: bool = False):
    """Our builder and training pipeline as a keras-tuner ``HyperModel``: ``build`` makes a
    fresh compiled model of the trial's params, ``fit`` trains it on our ``tf.data``
    pipeline with the trial's batch size, recording each epoch as it ends. With
    ``defaults``, as keras-tuner's documentation has a user write it: ``model.fit`` on the
    split's NumPy arrays, one step per compiled call."""
    import keras
    import keras_tuner as kt

    from mnist_opt.study.space import suggest_params
    from mnist_opt.training.loop import (STEPS_PER_EXECUTION, classes_of, compile_model,
                                         fresh_model, make_dataset)

    class Recorder(keras.callbacks.Callback):
        def __init__(self, log: list):
            super().__init__()
            self.log = log

        def on_epoch_end(self, epoch, logs=None):
            self.log.append([time.time(), _float((logs or {}).get("val_accuracy"))])
            budget.done += 1

    class HyperModel(kt.HyperModel):
        def __init__(self):
            super().__init__()
            self.current: dict[str, Any] | None = None
            self.count = 0

        def begin(self, trial_id: str) -> None:
            self.current = {"id": trial_id, "start": time.time(), "epoch_log": [],
                            "params": {}, "distributions": {}}

        def end(self) -> dict[str, Any]:
            record, self.current = self.current, None
            self.count += 1
            return record

        def _params(self, hp) -> dict[str, Any]:
            space = KerasTunerTrial(hp)
            params = suggest_params(space, cfg)
            if self.current is not None:  # not keras-tuner's first look at the space
                self.current["distributions"] = space.distributions
                self.current["params"] = {k: params[k] for k in space.distributions}
            return params

        def build(self, hp):
            params = self._params(hp)
            # like our objective: a fresh session, seeded per trial
            model = fresh_model(params, seed + self.count)
            return compile_model(model, params, n_train, 1 if defaults else STEPS_PER_EXECUTION,
                                 cfg.training.max_epochs)

        def fit(self, hp, model, train_xy, val_xy, callbacks=(), **kwargs):
            params = self._params(hp)
            batch = params["batch_size"]
            kwargs.pop("verbose", None)  # search's, passed on by keras-tuner: ours is 0
            log = self.current["epoch_log"] if self.current is not None else []
            classes = classes_of(model)  # one-hot targets under label smoothing
            if defaults:
                def arrays(xy):
                    return xy if classes is None else (xy[0], keras.utils.to_categorical(
                        xy[1], classes))
                return model.fit(*arrays(train_xy), batch_size=batch,
                                 validation_data=arrays(val_xy),
                                 callbacks=[*callbacks, Recorder(log)], verbose=0, **kwargs)
            return model.fit(
                make_dataset(*train_xy, batch_size=batch, shuffle_seed=seed + self.count,
                             classes=classes),
                validation_data=make_dataset(*val_xy, batch_size=max(batch, 512),
                                             classes=classes),
                callbacks=[*callbacks, Recorder(log)], verbose=0, shuffle=False, **kwargs)

    return HyperModel()


def _log_curve(study) -> None:
    """Every epoch's validation accuracy in the order the epochs ended (step: epochs trained,
    all trials together), and the repeat's totals, on the active MLflow run (one batch)."""
    import mlflow
    from mlflow.entities import Metric

    from mnist_opt.reporting.time_to_target import curve, epochs_of

    trials = study.get_trials(deepcopy=False)
    # the order and the best so far of the comparison's own definition
    epochs = sorted(epochs_of(trials), key=lambda e: (e.time, e.trial))
    steps = curve(epochs, clock_start=0.0)
    metrics, now = [], int(time.time() * 1000)
    for step, (epoch, best) in enumerate(zip(epochs, steps.best), 1):
        if epoch.accuracy is not None:
            when = int(epoch.time * 1000)
            metrics += [Metric("val_accuracy", epoch.accuracy, when, step),
                        Metric("best_val_accuracy_so_far", float(best), when, step)]
    metrics += [Metric("trials", len(trials), now, 0), Metric("epochs", len(epochs), now, 0)]
    if len(steps.best) and math.isfinite(steps.best[-1]):  # nan: no epoch had an accuracy
        metrics.append(Metric("best_val_accuracy", float(steps.best[-1]), now, 0))
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # the store's limit per batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_opt.search.kt_repeat",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--storage", required=True, help="the storage of the repeat's study")
    parser.add_argument("--tuner", required=True, choices=["kt-hyperband", "kt-bayesian",
                                                           "kt-random"])
    parser.add_argument("--defaults", action="store_true",
                        help="keras-tuner as its documentation starts a user: model.fit on "
                             "NumPy arrays, its own hyperband_iterations / num_initial_points")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    from mnist_opt.study.config import load_config
    from mnist_opt.training.backend import apply, choose

    cfg = load_config(args.study_file)
    apply(choose(cfg)[0])  # the backend our repeats of this study train on
    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()  # quietly, before Keras and keras-tuner import it
    import optuna

    import mlflow

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.tracking.storage import make_storage
    from mnist_opt.training.loop import study_split

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=cfg.name, storage=make_storage(args.storage))
    split = study_split(cfg)
    seed = cfg.search.seed
    budget = _Budget(cfg)  # the search's clock, as our runner's timeout counts it
    hypermodel = _hypermodel(cfg, len(split.y_train), budget, seed, args.defaults)
    tracking.configure()
    extra = {"tool": f"keras-tuner {importlib.metadata.version('keras-tuner')}",
             "tuner": args.tuner, "kt_defaults": args.defaults}
    # the repeat's own MLflow run, nested under the compare run as our repeats' are; the
    # trials are in the Optuna study, the curve is logged here as it was recorded
    with tracking.study_run(cfg, args.storage, extra):
        mlflow.set_tag("mnist_opt.tool", "keras-tuner")
        with tempfile.TemporaryDirectory(prefix="mnist_opt_kt_") as directory:
            tuner = _tuner(args.tuner, cfg, study, hypermodel, budget, seed, directory,
                           args.defaults)
            tuner.search((split.x_train, split.y_train), (split.x_val, split.y_val),
                         epochs=cfg.training.max_epochs, verbose=1 if args.verbose else 0)
        _log_curve(study)
    print(f"{args.tuner}: {hypermodel.count} trials, {budget.done} epochs, "
          f"{time.time() - budget.start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
