"""mnist_opt against keras-tuner: same space, data, and trial/epoch budget, on this machine.

    python bench/bench.py            # full: 54,000 training images (make bench)
    python bench/bench.py --quick    # reduced: a stratified subset, fewer trials (make bench-quick)

Workloads:
  classic  the 4-layer MNIST MLP (82-4-76-12, BN + ReLU + dropout), per-layer dropout and LR;
           keras-tuner Hyperband (max 10 epochs, factor 3) vs our TPE + Hyperband pruner with
           the same number of trials.
  fashion  the Fashion-MNIST MLP space of the keras-tuner tutorial; keras-tuner
           BayesianOptimization vs our TPE and GP, same trials and epochs per trial.
Also: our per-epoch overhead against a bare ``model.fit`` of one fixed configuration, and
RSS after each of 30+ trials. Prints a table, then one JSON line (the last line).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mnist_opt import data  # noqa: E402
from mnist_opt.config import StudyConfig, find_study, with_overrides  # noqa: E402
from mnist_opt.models import build_model  # noqa: E402
from mnist_opt.runner import run_study  # noqa: E402
from mnist_opt.space import suggest_params  # noqa: E402
from mnist_opt.training import compile_model, evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class KerasTunerTrial:
    """Lets ``space.suggest_params`` define the same space for keras-tuner's ``hp``."""

    def __init__(self, hp: kt.HyperParameters):
        self.hp = hp

    def suggest_float(self, name, low, high, step=None, log=False):
        return self.hp.Float(name, low, high, step=step, sampling="log" if log else "linear")

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.hp.Int(name, low, high, step=step, sampling="log" if log else "linear")

    def suggest_categorical(self, name, choices):
        return self.hp.Choice(name, list(choices))


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter())


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def retrain_test(params: dict, split: data.Split, ds: data.Dataset, epochs: int) -> float:
    """The same recipe for both tools' best configuration: train+val, then the test set."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x = np.concatenate([split.x_train, split.x_val])
    y = np.concatenate([split.y_train, split.y_val])
    model = build_model(params)
    train(model, params, (x, y), None, epochs)
    return evaluate(model, data.to_float(ds.x_test), ds.y_test.astype("int64"))["accuracy"]


def run_keras_tuner(cfg: StudyConfig, split: data.Split, tuner_cls, workdir: Path, **kwargs):
    def build(hp):
        params = suggest_params(KerasTunerTrial(hp), cfg)
        return compile_model(build_model(params), params, len(split.y_train))

    tuner = tuner_cls(build, objective="val_accuracy", directory=str(workdir),
                      project_name=tuner_cls.__name__, overwrite=True, seed=cfg.search.seed,
                      **kwargs)
    batch = cfg.space.get("batch_size", 128)
    start = time.perf_counter()
    tuner.search(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
                 batch_size=batch if isinstance(batch, int) else 128, verbose=0, **({} if "max_epochs" in kwargs else
                                          {"epochs": cfg.training.max_epochs}))
    wall = time.perf_counter() - start
    trials = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    # keras-tuner deep-copies callbacks per trial, so count epochs from its own records:
    # a Hyperband trial trains from tuner/initial_epoch to tuner/epochs, others all epochs.
    epochs = sum(t.hyperparameters.values.get("tuner/epochs", cfg.training.max_epochs)
                 - t.hyperparameters.values.get("tuner/initial_epoch", 0) for t in trials)
    best = tuner.oracle.get_best_trials(1)[0]
    values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    params = suggest_params(optuna.trial.FixedTrial(values), cfg)
    return {"wall_s": wall, "trials": len(trials), "epochs": epochs,
            "best_val_acc": float(best.score), "params": params}


def run_ours(cfg: StudyConfig, workdir: Path, workers: int, callbacks=()):
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    start = time.perf_counter()
    study = run_study(cfg, storage, verbose=False, progress=False, workers=workers,
                      callbacks=callbacks)
    wall = time.perf_counter() - start
    finished = [t for t in study.trials if t.state.is_finished()
                and t.state != optuna.trial.TrialState.FAIL]
    params = suggest_params(optuna.trial.FixedTrial(study.best_params), cfg)
    return {"wall_s": wall, "trials": len(finished),
            "epochs": sum(len(t.intermediate_values) for t in finished),
            "best_val_acc": float(study.best_value), "params": params, "study": study}


def fixed_space(params: dict) -> dict:
    """A study-file space that fixes every parameter to ``params`` (per-layer ones as lists)."""
    space: dict = {}
    for key, value in params.items():
        match = re.fullmatch(r"(units|dropout|filters)_[lb]\d+", key)
        if match:
            space.setdefault(match[1], []).append(value)
        else:
            space[key] = value
    return space


def overhead(cfg: StudyConfig, fixed: dict, split: data.Split, workdir: Path, epochs: int) -> dict:
    """Per-epoch time of one fixed configuration: inside our trial vs a bare ``model.fit``."""
    keras.backend.clear_session()
    model = compile_model(build_model(fixed), fixed, len(split.y_train))
    counter = EpochTimer()
    start = time.perf_counter()
    model.fit(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
              batch_size=fixed["batch_size"], epochs=epochs, verbose=0, callbacks=[counter])
    bare = statistics.median(np.diff([start, *counter.times])[1:])
    ours_cfg = cfg.model_copy(update={
        "name": "overhead", "space": fixed_space(fixed),
        "search": cfg.search.model_copy(update={"n_trials": 1, "pruner": "none"}),
        "training": cfg.training.model_copy(update={"max_epochs": epochs})})
    result = run_ours(ours_cfg, workdir / "overhead", workers=1)
    run_id = result["study"].trials[0].user_attrs["mlflow_run_id"]
    stamps = [m.timestamp / 1000 for m in sorted(
        MlflowClient().get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]
    ours = statistics.median(np.diff(stamps))
    return {"bare_epoch_s": bare, "ours_epoch_s": ours, "overhead_ratio": ours / bare}


def memory(cfg: StudyConfig, workdir: Path, n_trials: int) -> dict:
    """RSS after each trial of an in-process study (data loaded once, session cleared)."""
    samples: list[float] = []
    mem_cfg = with_overrides(cfg.model_copy(update={"name": "memory"}), n_trials=n_trials,
                             max_epochs=1)
    run_ours(mem_cfg, workdir / "memory", workers=1,
             callbacks=[lambda study, trial: samples.append(rss_mb())])
    return {"rss_start_mb": samples[0], "rss_end_mb": samples[-1], "rss_max_mb": max(samples),
            "rss_growth_mb": samples[-1] - samples[0], "rss_trials": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="subset and fewer trials (< 10 min)")
    parser.add_argument("--workers", type=int, default=2, help="our parallel trials (default 2)")
    args = parser.parse_args()
    subset = 6000 if args.quick else None
    classic_epochs, fashion_trials, fashion_epochs = (4, 6, 3) if args.quick else (10, 20, 8)
    rows, out = [], {"quick": args.quick, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="mnist_opt_bench_") as tmp:
        work = Path(tmp)
        os.chdir(work)  # keras-tuner and MLflow write here, not in the repository
        classic = with_overrides(find_study("mlp_hyperband", ROOT / "studies"),
                                 max_epochs=classic_epochs, train_subset=subset)
        ds = data.load(classic.dataset)
        split = data.split(ds, classic.data.val_fraction, classic.data.seed, subset)
        ktr = run_keras_tuner(classic, split, kt.Hyperband, work / "kt_classic",
                              max_epochs=classic_epochs, factor=3)
        ours = run_ours(with_overrides(classic, n_trials=ktr["trials"]), work / "classic",
                        args.workers)
        for name, r in (("keras-tuner Hyperband", ktr), ("mnist_opt TPE+Hyperband", ours)):
            r["test_acc"] = retrain_test(r["params"], split, ds, classic_epochs)
            rows.append(("classic MLP", name, r))
        out["classic"] = _compare(ours, ktr)

        fashion = with_overrides(find_study("fashion_mlp_tpe", ROOT / "studies"),
                                 n_trials=fashion_trials, max_epochs=fashion_epochs,
                                 train_subset=subset)
        fds = data.load(fashion.dataset)
        fsplit = data.split(fds, fashion.data.val_fraction, fashion.data.seed, subset)
        ktf = run_keras_tuner(fashion, fsplit, kt.BayesianOptimization, work / "kt_fashion",
                              max_trials=fashion_trials)
        rows.append(("fashion MLP", "keras-tuner Bayesian", ktf))
        for sampler in ("tpe", "gp"):
            cfg = fashion.model_copy(update={"name": f"fashion_{sampler}", "search":
                                             fashion.search.model_copy(update={"sampler": sampler})})
            r = run_ours(cfg, work / f"fashion_{sampler}", args.workers)
            rows.append(("fashion MLP", f"mnist_opt {sampler.upper()}", r))
            out[f"fashion_{sampler}"] = _compare(r, ktf)
        for _, _, r in rows[2:]:
            r["test_acc"] = retrain_test(r["params"], fsplit, fds, fashion_epochs)
        out.update(overhead(classic, ours["params"], split, work, epochs=4 if args.quick else 6))
        out.update(memory(classic, work, n_trials=30 if args.quick else 40))
    out["time_ratio"] = out["classic"]["time_ratio"]
    out["val_acc_delta"] = out["classic"]["val_acc_delta"]
    _print_table(rows, out)
    print(json.dumps(out, sort_keys=True))
    return 0


def _compare(ours: dict, theirs: dict) -> dict:
    return {"time_ratio": ours["wall_s"] / theirs["wall_s"],
            "val_acc_delta": ours["best_val_acc"] - theirs["best_val_acc"]}


def _print_table(rows, out) -> None:
    print(f"\n{'workload':12} {'tool':26} {'wall s':>8} {'trials':>6} {'epochs':>6} "
          f"{'best val':>8} {'test':>7}")
    for workload, tool, r in rows:
        print(f"{workload:12} {tool:26} {r['wall_s']:8.1f} {r['trials']:6d} {r['epochs']:6d} "
              f"{r['best_val_acc']:8.4f} {r.get('test_acc', float('nan')):7.4f}")
    print(f"\nper-epoch overhead: ours {out['ours_epoch_s']:.3f} s vs bare fit "
          f"{out['bare_epoch_s']:.3f} s → ratio {out['overhead_ratio']:.3f}")
    print(f"RSS over {out['rss_trials']} trials: start {out['rss_start_mb']:.0f} MB, end "
          f"{out['rss_end_mb']:.0f} MB, max {out['rss_max_mb']:.0f} MB "
          f"(growth {out['rss_growth_mb']:+.0f} MB)")
    print("ratios: time (ours / keras-tuner, same trials) and best-val-accuracy delta:")
    for key in ("classic", "fashion_tpe", "fashion_gp"):
        print(f"  {key:12} time_ratio {out[key]['time_ratio']:.2f}  "
              f"val_acc_delta {out[key]['val_acc_delta']:+.4f}")


if __name__ == "__main__":
    sys.exit(main())
