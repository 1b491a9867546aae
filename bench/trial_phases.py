"""Where a trial's fixed cost goes: the objective's steps timed one by one.

    python bench/trial_phases.py                  # 10 trials, as a worker process runs them
    python bench/trial_phases.py --long-lived     # as the study's own process (-w 1), retrain

Trials of ``mlp_tpe``'s space drawn by random search (seeded), 3 epochs each on the full
training split, one thread, through the same functions a study calls (:func:`suggest_params`,
:func:`~mnist_opt.tracking.runs.trial_run`, :func:`~mnist_opt.training.loop.fresh_model`,
:func:`~mnist_opt.training.loop.train` with the trial callback,
:func:`~mnist_opt.tracking.runs.log_model`), in a throw-away Optuna and MLflow store under
``bench/work/phases/``. A worker process freezes what survives each trial's collection
(``freeze=True``), a long-lived process does not. Prints each trial's phases in seconds and
their medians; the first trial also pays for the process's first model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--long-lived", action="store_true",
                        help="as a long-lived process: fresh_model(freeze=False)")
    args = parser.parse_args()
    from mnist_opt.quiet import import_tensorflow

    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import mlflow
    import numpy as np
    import optuna

    from mnist_opt.study.config import find_study
    from mnist_opt.study.space import suggest_params
    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.callbacks import TrialCallback
    from mnist_opt.training.loop import fresh_model, study_split, train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = ROOT / "bench" / "work" / "phases"  # git-ignored, measured afresh each time
    work.mkdir(parents=True, exist_ok=True)
    for db in work.glob("*.db"):
        db.unlink()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    tracking.configure()
    cfg = find_study("mlp_tpe")
    split = study_split(cfg)
    study = optuna.create_study(storage=f"sqlite:///{work / 'optuna.db'}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.NopPruner())
    parent = mlflow.start_run(experiment_id=tracking.experiment_id("phases"))

    class FirstCalls(keras.callbacks.Callback):
        """When fit began, and when its first training and validation calls returned."""

        def on_train_begin(self, logs=None):
            self.begin, self.begin_wall = time.perf_counter(), time.time()

        def on_train_batch_end(self, batch, logs=None):
            self.first = getattr(self, "first", None) or time.perf_counter()

        def on_test_begin(self, logs=None):
            self.val_begin = getattr(self, "val_begin", None) or time.perf_counter()

        def on_test_batch_end(self, batch, logs=None):
            self.val_first = getattr(self, "val_first", None) or time.perf_counter()

    rows = []
    for i in range(args.trials):
        row: dict[str, float] = {}
        trial = study.ask()
        t = time.perf_counter()
        params = suggest_params(trial, cfg)
        with tracking.trial_run(trial, params, parent):
            row["suggest+start_run"] = time.perf_counter() - t
            t = time.perf_counter()
            model = fresh_model(params, i, freeze=not args.long_lived)
            row["fresh_model"] = time.perf_counter() - t
            callback, calls = TrialCallback(trial, epochs=EPOCHS, verbose=False), FirstCalls()
            t = time.perf_counter()
            train(model, params, (split.x_train, split.y_train), (split.x_val, split.y_val),
                  EPOCHS, [calls, callback], seed=i)
            ends = [e for e, _ in callback.epoch_log]
            steady = float(np.mean(np.diff(ends)))
            row["compile+pipeline"] = calls.begin - t
            row["first_train_call"] = calls.first - calls.begin
            row["first_val_call"] = calls.val_first - calls.val_begin
            # the first epoch beyond a steady one: tracing both functions, mostly
            row["first_epoch_excess"] = ends[0] - calls.begin_wall - steady
            t = time.perf_counter()
            tracking.log_model(model)
            row["log_model"] = time.perf_counter() - t
            row["steady_epoch"] = steady
            t = time.perf_counter()
        row["end_run"] = time.perf_counter() - t
        study.tell(trial, float(callback.epoch_log[-1][1]))
        rows.append(row)
        print(f"trial {i}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    mlflow.end_run()
    print(f"median over {len(rows)} trials ({'long-lived process' if args.long_lived else 'worker process'}): "
          + "  ".join(f"{k} {statistics.median(r[k] for r in rows):.3f}" for k in rows[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
