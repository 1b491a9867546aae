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
RSS after each of 30+ trials (in one process, and with our recycled
workers). Prints a table, then one JSON line (the last line).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mnist_opt.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # before Keras: no start-up noise or retracing notices in the report
import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import psutil  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mnist_opt import data  # noqa: E402
from mnist_opt.study.config import StudyConfig, find_study, with_overrides  # noqa: E402
from mnist_opt.training.models import build_model  # noqa: E402
from mnist_opt.search.kt_repeat import KerasTunerTrial  # noqa: E402
from mnist_opt.search.runner import run_study  # noqa: E402
from mnist_opt.study.params import table  # noqa: E402
from mnist_opt.study.space import fixed_space, suggest_params  # noqa: E402
from mnist_opt.training.loop import compile_model, evaluate, fresh_model, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter())


def retrain_test(params: dict, split: data.Split, ds: data.Dataset, epochs: int) -> float:
    """The same recipe for both tools' best configuration: train+val, then the test set."""
    x = np.concatenate([split.x_train, split.x_val])
    y = np.concatenate([split.y_train, split.y_val])
    model = fresh_model(params, seed=0)
    train(model, params, (x, y), None, epochs)
    return evaluate(model, data.to_float(ds.x_test), ds.y_test.astype("int64"))["accuracy"]


def run_keras_tuner(cfg: StudyConfig, split: data.Split, tuner_cls, workdir: Path, **kwargs):
    def build(hp):
        params = suggest_params(KerasTunerTrial(hp), cfg)
        return compile_model(build_model(params), params, len(split.y_train))

    tuner = tuner_cls(build, objective="val_accuracy", directory=str(workdir),
                      project_name=tuner_cls.__name__, overwrite=True, seed=cfg.search.seed,
                      **kwargs)
    # keras-tuner takes one batch size for the whole search: the study's if fixed, else the
    # table's default
    batch = cfg.space.get("batch_size")
    batch = batch if isinstance(batch, int) else table(cfg.model)["batch_size"].default
    start = time.perf_counter()
    tuner.search(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
                 batch_size=batch, verbose=0,
                 **({} if "max_epochs" in kwargs else {"epochs": cfg.training.max_epochs}))
    wall = time.perf_counter() - start
    trials = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    # keras-tuner deep-copies callbacks per trial, so count epochs from its own records:
    # a Hyperband trial trains from tuner/initial_epoch to tuner/epochs, others all epochs.
    epochs = sum(t.hyperparameters.values.get("tuner/epochs", cfg.training.max_epochs)
                 - t.hyperparameters.values.get("tuner/initial_epoch", 0) for t in trials)
    best = tuner.oracle.get_best_trials(1)[0]
    values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    params = suggest_params(optuna.trial.FixedTrial(values), cfg)
    full = [t for t in trials  # trained to the full budget (Hyperband: its last round)
            if t.hyperparameters.values.get("tuner/epochs", cfg.training.max_epochs)
            == cfg.training.max_epochs]
    last = [float(np.mean(t.metrics.get_history("val_accuracy")[-1].value)) for t in full]
    return {"wall_s": wall, "trials": len(trials), "epochs": epochs,
            "best_val_acc": float(best.score), "final_val_acc": max(last, default=float("nan")),
            "params": params}


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
    # keras-tuner scores a trial by its best epoch (MetricsTracker.get_best_value), Optuna by
    # what the objective returns (the last epoch): report both statistics for both tools
    best_epoch = max((max(t.intermediate_values.values()) for t in finished
                      if t.intermediate_values), default=float("nan"))
    return {"wall_s": wall, "trials": len(finished),
            "epochs": sum(len(t.intermediate_values) for t in finished),
            "best_val_acc": best_epoch, "final_val_acc": float(study.best_value),
            "params": params, "study": study}


def overhead(cfg: StudyConfig, fixed: dict, split: data.Split, workdir: Path, epochs: int) -> dict:
    """Per-epoch time of one fixed configuration: inside our trial vs a bare ``model.fit``."""
    model = compile_model(fresh_model(fixed, seed=0), fixed, len(split.y_train))
    counter = EpochTimer()
    start = time.perf_counter()
    model.fit(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
              batch_size=fixed["batch_size"], epochs=epochs, verbose=0, callbacks=[counter])
    bare = statistics.median(np.diff([start, *counter.times])[1:])
    ours_cfg = cfg.model_copy(update={
        "name": "overhead", "space": fixed_space(cfg.model, fixed),
        "search": cfg.search.model_copy(update={"n_trials": 1, "pruner": "none"}),
        "training": cfg.training.model_copy(update={"max_epochs": epochs})})
    result = run_ours(ours_cfg, workdir / "overhead", workers=1)
    run_id = result["study"].trials[0].user_attrs["mlflow_run_id"]
    stamps = [m.timestamp / 1000 for m in sorted(
        MlflowClient().get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]
    ours = statistics.median(np.diff(stamps))
    return {"bare_epoch_s": bare, "ours_epoch_s": ours, "overhead_ratio": ours / bare}


def memory(cfg: StudyConfig, workdir: Path, n_trials: int, workers: int) -> dict:
    """RSS after each trial, as each trial records it: in one process, and with our workers.

    In one process TensorFlow's per-model leak shows (tf-keras#286); worker processes are
    replaced every ``trials_per_worker`` trials, which bounds it. Data is loaded once per
    process and the Keras session cleared before every trial in both cases.
    """
    mem_cfg = with_overrides(cfg.model_copy(update={"name": "memory"}), n_trials=n_trials,
                             max_epochs=1)
    out = {}
    for key, n in (("in_process", 1), ("workers", workers)):
        study = run_ours(mem_cfg.model_copy(update={"name": f"memory_{key}"}),
                         workdir / f"memory_{key}", workers=n)["study"]
        trials = sorted((t for t in study.trials if "rss_mb" in t.user_attrs),
                        key=lambda t: t.datetime_complete)
        by_pid: dict[int, list[float]] = {}
        for t in trials:
            by_pid.setdefault(t.user_attrs["pid"], []).append(t.user_attrs["rss_mb"])
        rss = [t.user_attrs["rss_mb"] for t in trials]
        out[key] = {"trials": len(rss), "processes": len(by_pid), "start_mb": rss[0],
                    "end_mb": rss[-1], "max_mb": max(rss),
                    # the most any one process grew after its first trial
                    "growth_mb": max(max(v) - v[0] for v in by_pid.values())}
    return {"memory": out, "rss_start_mb": out["workers"]["start_mb"],
            "rss_end_mb": out["workers"]["end_mb"], "rss_max_mb": out["workers"]["max_mb"],
            "rss_growth_mb": out["workers"]["growth_mb"], "rss_trials": out["workers"]["trials"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="subset and fewer trials (< 10 min)")
    parser.add_argument("--workers", type=int, default=2, help="our parallel trials (default 2)")
    parser.add_argument("--save", type=Path, help="also write the output, the command and the "
                                                  "machine to this markdown file")
    args = parser.parse_args()
    if args.save:
        args.save = args.save.resolve()  # the benchmark works in a temporary directory
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
        out.update(memory(classic, work, 30 if args.quick else 40, args.workers))
    out["time_ratio"] = out["classic"]["time_ratio"]
    out["val_acc_delta"] = out["classic"]["val_acc_delta"]
    text = _table(rows, out) + "\n" + json.dumps(out, sort_keys=True)
    print(text)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(_report(text, started, args))
        print(f"wrote {args.save}")
    return 0


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = psutil.virtual_memory().total / 2**30
    versions = ", ".join(f"{pkg} {importlib.metadata.version(pkg)}" for pkg in
                         ("tensorflow", "keras", "keras-tuner", "optuna", "mlflow", "numpy"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; "
            f"{platform.platform()}; Python {platform.python_version()}; {versions}")


def _report(text: str, started: str, args) -> str:
    flags = " ".join(f for f in ("--quick" if args.quick else "",
                                 f"--workers {args.workers}" if args.workers != 2 else "") if f)
    command = "make bench-quick" if args.quick else "make bench"
    return (f"# mnist_opt vs keras-tuner: {command}\n\n"
            f"- command: `{command}` (runs `{f'python bench/bench.py {flags}'.strip()}` from the "
            f"repository root)\n- started: {started}, finished: "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n- machine: {_machine()}\n\n"
            "Timings on these machines are noisy and differ between machines: read the "
            "ratios, which compare runs inside this one invocation.\n\n"
            f"```\n{text}\n```\n")


def _compare(ours: dict, theirs: dict) -> dict:
    return {"time_ratio": ours["wall_s"] / theirs["wall_s"],
            "val_acc_delta": ours["best_val_acc"] - theirs["best_val_acc"],
            "final_val_acc_delta": ours["final_val_acc"] - theirs["final_val_acc"]}


def _table(rows, out) -> str:
    lines = [f"{'workload':12} {'tool':26} {'wall s':>8} {'trials':>6} {'epochs':>6} "
             f"{'best val':>8} {'final val':>9} {'test':>7}"]
    for workload, tool, r in rows:
        lines.append(f"{workload:12} {tool:26} {r['wall_s']:8.1f} {r['trials']:6d} "
                     f"{r['epochs']:6d} {r['best_val_acc']:8.4f} {r['final_val_acc']:9.4f} "
                     f"{r.get('test_acc', float('nan')):7.4f}")
    lines.append("best val: the best epoch of any trial (keras-tuner's trial score); final val: "
                 "the last epoch of a trial trained to the full budget (Optuna's value)")
    lines.append(f"\nper-epoch overhead: ours {out['ours_epoch_s']:.3f} s vs bare fit "
                 f"{out['bare_epoch_s']:.3f} s → ratio {out['overhead_ratio']:.3f}")
    for key, m in out["memory"].items():
        lines.append(f"RSS {key:10} over {m['trials']} trials in {m['processes']} process(es): "
                     f"start {m['start_mb']:.0f} MB, end {m['end_mb']:.0f} MB, max "
                     f"{m['max_mb']:.0f} MB; most one process grew {m['growth_mb']:+.0f} MB")
    lines.append("ratios: time (ours / keras-tuner, same trials) and best-val-accuracy delta:")
    for key in ("classic", "fashion_tpe", "fashion_gp"):
        lines.append(f"  {key:12} time_ratio {out[key]['time_ratio']:.2f}  "
                     f"val_acc_delta {out[key]['val_acc_delta']:+.4f}  "
                     f"final_val_acc_delta {out[key]['final_val_acc_delta']:+.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
