"""mnist_opt against keras-tuner, repeated and like for like, built on ``mnist-opt compare``.

    python bench/bench.py                 # full: 54,000 training images, 3 repeats (make bench)
    python bench/bench.py --quick         # reduced: a 6,000-image subset, 2 repeats (make bench-quick)
    python bench/bench.py --render        # only rewrite latest.md and the README from latest.json

Each workload is a ``compare`` (:mod:`mnist_opt.search.compare`) of three strategies on one
study's space and data, one worker process per repeat, the same trial budget, every repeat's
best configuration retrained and scored on the test set. Two modes are read from it:

* **like for like**: keras-tuner on our ``tf.data`` pipeline with 8 steps per compiled call,
  Bayesian search with our number of random start-up trials, and the same pruning choice
  (Hyperband vs our Hyperband pruner; Bayesian vs TPE without pruning);
* **out of the box**: each tool as its documentation starts a user: keras-tuner's defaults
  (``model.fit`` on NumPy arrays, one step per call, its own ``num_initial_points`` and
  ``hyperband_iterations``) vs the study file's own sampler and pruner as ``make study`` runs
  it, on every usable core (``--workers auto``): a second ``compare``, at the first one's
  target, since a compare gives all its strategies one worker count and keras-tuner has one.

The headline is the **time-to-target ratio**, ours / keras-tuner's, of the median seconds from
the tool's process start until the best-so-far validation accuracy reaches the compare's
target (:mod:`mnist_opt.reporting.time_to_target`). Also: per-epoch time against a bare
``model.fit``, and RSS after every trial of one process running 40 trials and of recycled
worker processes. Everything goes to ``bench/results/latest.json``, from which
``latest.md`` and the README's section are generated (``--render``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"

# workload: the study whose space and data are searched, the trial budget, epochs per trial,
# and for each mode the pair (ours, keras-tuner's) of strategies compared. "ours" out of the
# box is the study file's own sampler+pruner, filled in by _strategies.
WORKLOADS: dict[str, dict[str, Any]] = {
    "classic": {"study": "mlp_hyperband", "trials": 30, "max_epochs": 10,
                "title": "classic MNIST MLP (mlp_hyperband's space)",
                "like_for_like": ("tpe+hyperband", "kt-hyperband"),
                "out_of_the_box": (None, "kt-hyperband-defaults")},
    "fashion": {"study": "fashion_mlp_tpe", "trials": 20, "max_epochs": 8,
                "title": "Fashion-MNIST MLP (fashion_mlp_tpe's space)",
                "like_for_like": ("tpe+none", "kt-bayesian"),
                "out_of_the_box": (None, "kt-bayesian-defaults")},
    "mlp_tpe": {"study": "mlp_tpe", "trials": 30, "max_epochs": 12,
                "title": "MNIST MLP (mlp_tpe's space)",
                "like_for_like": ("tpe+hyperband", "kt-hyperband"),
                "out_of_the_box": (None, "kt-hyperband-defaults")},
}
QUICK = {"trials": 8, "max_epochs": 3, "train_subset": 6000, "repeats": 2}
MODES = ("like_for_like", "out_of_the_box")


def _strategies(workload: dict[str, Any], study_pair: str) -> dict[str, tuple[str, str]]:
    """mode → (ours, keras-tuner's), ours out of the box being the study file's own."""
    return {mode: (workload[mode][0] or study_pair, workload[mode][1]) for mode in MODES}


def _median(values: list[float]) -> float | None:
    """Median with "not reached" (inf) ranked last; None when the median is not reached."""
    if not values:
        return None
    m = statistics.median(values)
    return m if math.isfinite(m) else None


def _spread(values: list[float | None]) -> dict[str, Any]:
    """median, min, max of per-repeat figures (None: not reached, ranked last)."""
    ranked = [math.inf if v is None else v for v in values]
    finite = [v for v in ranked if math.isfinite(v)]
    return {"values": values, "median": _median(ranked), "min": min(finite, default=None),
            "max": None if len(finite) < len(ranked) else max(finite, default=None)}


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either was not reached (no number stands for "not reached")."""
    return a / b if a is not None and b is not None and b > 0 else None


def ratio_figures(a: dict, b: dict, key: str = "time_to_target") -> dict[str, Any]:
    """Ours (``a``) / keras-tuner's (``b``) for one per-repeat figure: the ratio of the two
    medians, and its range over every pair of repeats that both reached (repeats are not
    paired: a seed means nothing shared across tools), with how many repeats reached."""
    xs, ys = a[key]["values"], b[key]["values"]
    pairs = [x / y for x in xs for y in ys if x is not None and y is not None and y > 0]
    return {"ratio": _ratio(a[key]["median"], b[key]["median"]),
            "pairs_min": min(pairs, default=None), "pairs_max": max(pairs, default=None),
            "reached": [sum(v is not None for v in xs), len(xs)],
            "reached_theirs": [sum(v is not None for v in ys), len(ys)]}


def final_val(study, max_epochs: int) -> float | None:
    """The best last-epoch validation accuracy of the trials that were trained to the full
    ``max_epochs`` (Optuna's value for a complete trial; a keras-tuner Hyperband trial of the
    last round of a bracket ends there too)."""
    finals = []
    for t in study.get_trials(deepcopy=False):
        log = t.user_attrs.get("epoch_log") or []
        last = t.user_attrs.get("kt_hyperband", {}).get("epochs", len(log))
        if log and last == max_epochs and log[-1][1] is not None:
            finals.append(float(log[-1][1]))
    return max(finals, default=None)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (commands, reports)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _compare_command(study: str, names: list[str], repeats: int, trials: int, epochs: int,
                     subset: int | None, folder: Path, db: Path, workers: int,
                     target: float | None = None) -> str:
    """The ``mnist-opt compare`` command line that :func:`run_workload` runs as a function."""
    return shlex.join(["mnist-opt", "compare", study, "--strategies", *names,
                       "--repeats", str(repeats), "--budget-trials", str(trials),
                       "--workers", str(workers), "--retrain", "--max-epochs", str(epochs),
                       *(["--train-subset", str(subset)] if subset else []),
                       *(["--target", f"{target:.4f}"] if target is not None else []),
                       "--out", _shown(folder), "--storage", f"sqlite:///{_shown(db)}"])


def _figures(todo: list, storage: str, target: float, epochs: int) -> tuple[dict, dict]:
    """strategy label → figure → median/min/max over the compare's repeats; and label →
    the repeats' results (for a verdict across two compares)."""
    import optuna

    from mnist_opt.reporting.time_to_target import repeat_result, time_to_target
    from mnist_opt.reporting.trial_cost import fixed_costs

    per: dict[str, dict[str, list]] = {}
    results: dict[str, list] = {}
    for repeat in todo:
        study = optuna.load_study(study_name=repeat.name, storage=storage)
        r = repeat_result(study)
        results.setdefault(repeat.strategy.label, []).append(r)
        fig = per.setdefault(repeat.strategy.label, {k: [] for k in (
            "time_to_target", "wall_s", "best_val", "final_val", "test_acc", "epochs",
            "trials", "fixed_cost_s")})
        fig["time_to_target"].append(time_to_target(r.curve, target))
        fig["wall_s"].append(r.wall_s)
        fig["best_val"].append(r.final_best)
        fig["final_val"].append(final_val(study, epochs))
        fig["test_acc"].append(r.test_accuracy)
        fig["epochs"].append(r.epochs)
        fig["trials"].append(r.n_complete + r.n_pruned + r.n_failed)
        fig["fixed_cost_s"].append(fixed_costs(study.get_trials(deepcopy=False)).median)
    return {name: {k: _spread(v) for k, v in fig.items()} for name, fig in per.items()}, results


def run_workload(key: str, quick: bool, repeats: int, db: Path, folder: Path) -> dict:
    """The workload's compares; the per-repeat figures of each strategy.

    One compare in one worker process per repeat holds both tools' like-for-like strategies
    and keras-tuner's defaults; out of the box, ours runs as ``make study`` starts it, on
    every core (``--workers auto``), in a second compare at the first one's target (a
    compare runs all its strategies with one worker count, and keras-tuner has one process).
    """
    from mnist_opt.reporting.time_to_target import compare_pair
    from mnist_opt.search.compare import compare
    from mnist_opt.search.cores import auto_workers
    from mnist_opt.search.strategies import Budget, parse_strategies, plan
    from mnist_opt.study.config import find_study

    work = WORKLOADS[key]
    cfg = find_study(work["study"], ROOT / "studies")
    study_pair = f"{cfg.search.sampler}+{cfg.search.pruner}"
    pairs = _strategies(work, study_pair)
    workers = auto_workers().workers  # what `make study` starts out of the box
    names = list(dict.fromkeys(s for mode, pair in pairs.items() for s in pair
                               if not (mode == "out_of_the_box" and s == study_pair
                                       and workers > 1)))
    trials = QUICK["trials"] if quick else work["trials"]
    epochs = QUICK["max_epochs"] if quick else work["max_epochs"]
    subset = QUICK["train_subset"] if quick else None
    budget = Budget(trials=trials)

    def one_compare(names: list[str], folder: Path, db: Path, workers: int,
                    target: float | None = None):
        command = _compare_command(work["study"], names, repeats, trials, epochs, subset,
                                   folder, db, workers, target)
        print(f"\n== {key}: {command}", flush=True)
        todo = plan(cfg, parse_strategies(names), repeats, budget, folder, epochs, subset)
        storage = f"sqlite:///{db}"
        out = compare(cfg, todo, budget, workers, storage, target, command, folder, retrain=True)
        return (command, out, *_figures(todo, storage, out.target, epochs))

    command, out, strategies, results = one_compare(names, folder, db, 1)
    commands, verdict, folders = [command], list(out.verdict), [folder]
    ours_workers = {mode: 1 for mode in pairs}
    if workers > 1:
        folders.append(folder.with_name(f"{folder.name}-auto"))
        auto, _, figures, auto_results = one_compare(
            [study_pair], folders[-1], db.with_name(f"{db.stem}-auto{db.suffix}"), workers,
            out.target)
        label, theirs = f"{study_pair}, {workers} workers", pairs["out_of_the_box"][1]
        strategies[label] = figures[study_pair]
        pairs["out_of_the_box"], ours_workers["out_of_the_box"] = (label, theirs), workers
        verdict.append(compare_pair(auto_results[study_pair], results[theirs], out.target,
                                    names=(label, theirs))["verdict"])
        commands.append(auto)
    # which strategies each mode compares, and with how many worker processes ours ran; its
    # ratios are derived from the figures when rendered (ratio_figures), so the JSON holds
    # each number once
    modes = {mode: {"ours": ours, "keras_tuner": theirs, "ours_workers": ours_workers[mode]}
             for mode, (ours, theirs) in pairs.items()}
    from mnist_opt.data import provenance
    from mnist_opt.training.backend import choose

    return {"study": work["study"], "title": work["title"], "command": "; ".join(commands),
            "data": provenance(cfg.dataset), "backend": choose(cfg)[1],
            "trials": trials, "max_epochs": epochs, "train_subset": subset,
            "repeats": repeats, "target": out.target, "target_source": out.target_source,
            "summaries": [_shown(f) for f in folders],
            "verdict": verdict, "strategies": strategies, "modes": modes}


def overhead(cfg, params: dict, workdir: Path, epochs: int) -> dict:
    """Per-epoch time of one fixed configuration: inside our trial vs a bare ``model.fit``."""
    import keras
    import numpy as np
    from mlflow.tracking import MlflowClient

    from mnist_opt.search.runner import run_study
    from mnist_opt.study.space import fixed_space
    from mnist_opt.training.loop import compile_model, fresh_model, study_split

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter())

    split = study_split(cfg)
    model = compile_model(fresh_model(params, seed=0), params, len(split.y_train))
    counter = EpochTimer()
    start = time.perf_counter()
    model.fit(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
              batch_size=params["batch_size"], epochs=epochs, verbose=0, callbacks=[counter])
    bare = statistics.median(np.diff([start, *counter.times])[1:])
    one = cfg.model_copy(update={
        "name": "overhead", "space": fixed_space(cfg.model, params),
        "search": cfg.search.model_copy(update={"n_trials": 1, "pruner": "none"}),
        "training": cfg.training.model_copy(update={"max_epochs": epochs})})
    db = workdir / "overhead.db"
    db.unlink(missing_ok=True)  # measured afresh on every run, not resumed
    study = run_study(one, f"sqlite:///{db}", verbose=False, progress=False, workers=1)
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    stamps = [m.timestamp / 1000 for m in sorted(
        MlflowClient().get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]
    ours = statistics.median(np.diff(stamps))
    return {"bare_epoch_s": bare, "ours_epoch_s": ours, "ratio": ours / bare, "epochs": epochs,
            "params": params}


def memory(cfg, workdir: Path, n_trials: int, workers: int) -> dict:
    """RSS after every trial (each trial records its process's ``rss_mb``): one process
    running all ``n_trials``, then ``workers`` recycled worker processes running them.

    In one process TensorFlow's per-model leak shows (tf-keras#286); worker processes are
    replaced every ``trials_per_worker`` trials, which bounds it.
    """
    from mnist_opt.search.runner import run_study
    from mnist_opt.study.config import with_overrides

    out = {}
    for key, n in (("one_process", 1), ("workers", workers)):
        run = with_overrides(cfg.model_copy(update={"name": f"memory_{key}"}),
                             n_trials=n_trials, max_epochs=1)
        db = workdir / f"memory_{key}.db"
        db.unlink(missing_ok=True)  # measured afresh on every run, not resumed
        study = run_study(run, f"sqlite:///{db}", verbose=False, progress=False, workers=n)
        trials = sorted((t for t in study.trials if "rss_mb" in t.user_attrs),
                        key=lambda t: t.datetime_complete)
        by_pid: dict[int, list[float]] = {}
        for t in trials:
            by_pid.setdefault(t.user_attrs["pid"], []).append(round(t.user_attrs["rss_mb"], 1))
        out[key] = {"trials": len(trials), "processes": len(by_pid),
                    "rss_after_each_trial_mb": [round(t.user_attrs["rss_mb"], 1) for t in trials],
                    "per_process": [{"trials": len(v), "first_mb": v[0], "max_mb": max(v),
                                     "growth_mb": round(max(v) - v[0], 1)}
                                    for v in by_pid.values()]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a {QUICK['train_subset']}-image subset, {QUICK['trials']} trials "
                             f"of ≤{QUICK['max_epochs']} epochs, {QUICK['repeats']} repeats")
    parser.add_argument("--repeats", type=int, help="repeats per strategy (default 3)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=list(WORKLOADS))
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of the memory figure (default 2)")
    parser.add_argument("--render", action="store_true",
                        help="only write latest.md and the README section from latest.json")
    args = parser.parse_args()
    if args.render:
        return render(json.loads((RESULTS / "latest.json").read_text()))
    repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)
    work = ROOT / "bench" / ("work-quick" if args.quick else "work")  # git-ignored
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")

    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()  # quietly, before Keras and MLflow import it
    import optuna

    from mnist_opt.study.config import find_study, with_overrides
    from mnist_opt.study.space import baseline_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "make bench-quick" if args.quick else "make bench"
    flags = [f for f in (f"--repeats {args.repeats}" if args.repeats else "",
                         "--workloads " + " ".join(args.workloads)
                         if args.workloads != list(WORKLOADS) else "") if f]
    if flags:
        command += f' ARGS="{" ".join(flags)}"'
    folders = (work / "compare") if args.quick else RESULTS
    path = (work if args.quick else RESULTS) / "latest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    from mnist_opt.reporting.machine import code_version, describe

    out = {"command": command, "started": started, "machine": describe(), "quick": args.quick,
           "code": code_version(),
           "workloads": {k: v for k, v in kept_workloads(old).items()
                         if k not in args.workloads}}
    for key in args.workloads:
        begun = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out["workloads"][key] = run_workload(key, args.quick, repeats, work / "optuna.db",
                                             folders / key)
        out["workloads"][key]["ran"] = {"started": begun, "command": command,
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "code": out["code"]}
    classic = with_overrides(find_study("mlp_hyperband", ROOT / "studies"),
                             train_subset=QUICK["train_subset"] if args.quick else None)
    print("\n== per-epoch overhead and memory", flush=True)
    out["overhead"] = overhead(classic, baseline_params(classic), work, 4 if args.quick else 6)
    out["memory"] = memory(classic, work, 30 if args.quick else 40, args.workers)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return render(out, readme=not args.quick, folder=path.parent)


def kept_workloads(old: dict) -> dict[str, dict]:
    """The previous latest.json's workloads, each with when and by which command and code it
    ran (``ran``; a file written before workloads carried it: that run's own header)."""
    return {key: {**w, "ran": w.get("ran") or {k: old.get(k) for k in (
                "started", "finished", "code", "command")}}
            for key, w in old.get("workloads", {}).items()}


# -- rendering: latest.md and the README section, from latest.json only ----------------------

def _f(value: float | None, digits: int = 4, unit: str = "") -> str:
    return "not reached" if value is None else f"{value:.{digits}f}{unit}"


def _cell(spread: dict, digits: int = 4, unit: str = "") -> str:
    """``median (min–max)``; max "not reached" when a repeat did not reach it."""
    if spread["median"] is None and spread["min"] is None:
        return "not reached"
    top = "not reached" if spread["max"] is None else _f(spread["max"], digits)
    return f"{_f(spread['median'], digits, unit)} ({_f(spread['min'], digits)}–{top})"


def _headline(r: dict) -> str:
    """``**0.58** (0.38–1.34 over all pairs)``, or why there is no ratio."""
    if r["ratio"] is None:
        whose = "ours" if r["reached"][0] * 2 <= r["reached"][1] else "keras-tuner's"
        return f"– ({whose} median not reached)"
    spread = ("" if r["pairs_min"] is None else
              f" ({r['pairs_min']:.2f}–{r['pairs_max']:.2f} over all pairs)")
    return f"**{r['ratio']:.2f}**{spread}"


def comparison_table(out: dict) -> str:
    """One row per workload and mode: the headline ratio, then each side's figures, computed
    from each strategy's per-repeat values (so ``--render`` applies today's definitions)."""
    lines = ["| workload | mode | strategies (ours vs keras-tuner) | **time-to-target ratio** "
             "(ratio of medians; range over all pairs of repeats that reached) | reached "
             "(ours, kt) | wall ratio, full budget | epochs ratio, full budget | time to "
             "target, s | best val | final val | test acc (retrained best) | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in out["workloads"].values():
        for mode, m in w["modes"].items():
            a, b = w["strategies"][m["ours"]], w["strategies"][m["keras_tuner"]]
            ttt, wall = ratio_figures(a, b), ratio_figures(a, b, "wall_s")
            epochs = ratio_figures(a, b, "epochs")
            lines.append(
                f"| {w['title']}, {w['trials']} trials, ≤{w['max_epochs']} epochs, target "
                f"{w['target']:.4f} | {mode.replace('_', ' ')} | {m['ours']} vs "
                f"{m['keras_tuner']} | {_headline(ttt)} | "
                f"{ttt['reached'][0]}/{ttt['reached'][1]}, "
                f"{ttt['reached_theirs'][0]}/{ttt['reached_theirs'][1]} | "
                f"{_f(wall['ratio'], 2)} | {_f(epochs['ratio'], 2)} | "
                f"{_cell(a['time_to_target'], 0)} vs {_cell(b['time_to_target'], 0)} | "
                f"{_cell(a['best_val'])} vs {_cell(b['best_val'])} | "
                f"{_cell(a['final_val'])} vs {_cell(b['final_val'])} | "
                f"{_cell(a['test_acc'])} vs {_cell(b['test_acc'])} | "
                f"{_cell(a['epochs'], 0)} vs {_cell(b['epochs'], 0)} |")
    return "\n".join(lines)


def _notes(out: dict) -> list[str]:
    o, mem = out["overhead"], out["memory"]
    one, wk = mem["one_process"], mem["workers"]
    grow = max(p["growth_mb"] for p in wk["per_process"])
    repeats = sorted({w["repeats"] for w in out["workloads"].values()})
    hyperband_trials = "/".join(sorted({str(w["trials"]) for w in out["workloads"].values()
                                        if any("hyperband" in m["keras_tuner"]
                                               for m in w["modes"].values())}))
    targets = "; ".join(f"{w['title'].split(' (')[0]} {w['target']:.4f}, "
                        f"{_target_source(w['target_source'])}"
                        for w in out["workloads"].values())
    return [
        f"Each figure is the median over {'/'.join(map(str, repeats))} repeats (seeds differ "
        "across repeats, equal across tools) with min–max in brackets; \"not reached\" ranks "
        "last. Time to target: seconds from the tool's process start until the best "
        "validation accuracy of any completed epoch first reaches the target. Targets: "
        f"{targets}. The ratio is ours / keras-tuner's (below 1, ours reached it sooner); with "
        f"{'/'.join(map(str, repeats))} repeats a side no difference is significant (the "
        "compare verdicts below: Mann–Whitney U needs 5 a side). "
        "Best val: the best epoch of any trial (keras-tuner's score); final val: the last "
        "epoch of a trial trained to the full budget (Optuna's value); test acc: each "
        "repeat's best configuration retrained as `mnist-opt retrain` does (all training "
        "images of the workload) and scored on the test set. " + _workers_note(out) + " The "
        "same trial budget, as each tool counts trials: keras-tuner's "
        "Hyperband counts each round of a bracket as a trial and resumes a promoted "
        "configuration from its checkpoint (on Keras 3 without the optimizer's state), so its "
        f"{hyperband_trials} trials are fewer configurations and fewer epochs than our "
        f"{hyperband_trials} (epochs ratio column): the full-budget wall ratio compares "
        "unequal amounts of training, and a keras-tuner repeat that has not reached the target "
        "when its smaller budget ends counts as not reached.",
        "Data: " + "; ".join(f"{w['title'].split(' (')[0]}: {w.get('data', 'not recorded')}"
                             for w in out["workloads"].values()) + ".",
        *_fixed_cost_note(out),
        f"Per-epoch time of one configuration: {o['ours_epoch_s']:.3f} s inside our trial vs "
        f"{o['bare_epoch_s']:.3f} s for a bare `model.fit` on NumPy arrays (ratio "
        f"{o['ratio']:.2f}; median of {o['epochs'] - 1} epochs after the first).",
        f"Memory, one process running {one['trials']} one-epoch trials: RSS "
        f"{one['rss_after_each_trial_mb'][0]:.0f} MB after the first trial, "
        f"{max(one['rss_after_each_trial_mb']):.0f} MB at most, "
        f"{one['rss_after_each_trial_mb'][-1]:.0f} MB after the last "
        f"(+{one['per_process'][0]['growth_mb']:.0f} MB: TensorFlow's per-model leak). "
        f"The same {wk['trials']} trials in recycled worker processes "
        f"({wk['processes']} processes over the run, {max(p['trials'] for p in wk['per_process'])} "
        f"trials at most each): a worker process grew by {grow:.0f} MB at most.",
    ]


def _fixed_cost_note(out: dict) -> list[str]:
    """The per-trial fixed cost of each strategy (:mod:`mnist_opt.reporting.trial_cost`),
    where the JSON has it."""
    cells = [f"{w['title'].split(' (')[0]}, {name}: {_cell(fig['fixed_cost_s'], 2, ' s')}"
             for w in out["workloads"].values() for name, fig in w["strategies"].items()
             if "fixed_cost_s" in fig]
    if not cells:
        return []
    return ["Fixed cost per trial (wall time minus epochs trained × the trial's steady-state "
            "epoch time; each repeat's median over its trials with two or more epochs, then "
            "median (min–max) over repeats): " + "; ".join(cells) + "."]


def _workers_note(out: dict) -> str:
    """How many worker processes each side had (out of the box, ours may have several)."""
    auto = sorted({m.get("ours_workers", 1) for w in out["workloads"].values()
                   for m in w["modes"].values()} - {1})
    if not auto:
        return "One worker process per repeat for both tools."
    return (f"One worker process per repeat for both tools, except ours out of the box: "
            f"{' / '.join(map(str, auto))} workers (`--workers auto`, every usable core, as "
            "`make study` starts it; keras-tuner has no local parallel mode), in a second "
            "compare at the first one's target.")


def _target_source(source: str) -> str:
    """The compare's target source, shortly."""
    if source.startswith("default_target"):
        return ("chosen after the fact from this first run (the lowest median final best of "
                "the strategies; the next run uses it, fixed beforehand)")
    if source.startswith("the previous"):
        return "fixed before this run (the previous run's)"
    return "fixed before the run"


def _verdicts(out: dict) -> list[str]:
    """The compare verdicts of the pairs the table shows."""
    shown = {f"{m['ours']} vs {m['keras_tuner']}" for w in out["workloads"].values()
             for m in w["modes"].values()}
    return [f"- {w['title']}: {line}" for w in out["workloads"].values()
            for line in w["verdict"] if line.split(":")[0] in shown]


def _ran(w: dict) -> str:
    """When a workload ran, with which code and command (``ran``)."""
    r = w.get("ran") or {}
    return (f"{r.get('started', '?')} to {r.get('finished', '?')}, code "
            f"{r.get('code') or 'not recorded'}, by `{r.get('command', '?')}`"
            + (f" ({r['note']})" if r.get("note") else ""))


def render(out: dict, readme: bool = True, folder: Path = RESULTS) -> int:
    """``latest.md`` beside the JSON and, for a full run, the README's section."""
    table = comparison_table(out)
    notes = _notes(out)
    verdicts = _verdicts(out)
    md = "\n".join([
        f"# mnist_opt vs keras-tuner: {out['command']}", "",
        f"- command: `{out['command']}` (runs `python bench/bench.py` from the repository "
        "root; `python bench/bench.py --render` rewrites this file and the README section from "
        "`latest.json`)",
        f"- this invocation (the workloads it ran, the overhead and memory figures): started "
        f"{out['started']}, finished {out['finished']}; code: {out.get('code', 'not recorded')}",
        f"- machine: {out['machine']}",
        *[f"- {w['title']}: ran {_ran(w)}; `{w['command']}`; data: {w.get('data', 'not recorded')}; "
          f"Keras backend: {w.get('backend', 'not recorded')}; "
          f"target {w['target']:.4f} ({w['target_source']}); "
          "curves, table and per-repeat studies in "
          + ", ".join(f"`{folder}/`" for folder in w["summaries"])
          for w in out["workloads"].values()], "",
        "Timings on these machines are noisy and differ between machines: read the ratios, "
        "which compare runs inside one workload's run.", "",
        table, "", *[f"{n}\n" for n in notes],
        "The compare verdicts (Mann–Whitney U, α = 0.05; fewer than 5 repeats a side is "
        "\"too few repeats\"):", "", *verdicts, ""])
    (folder / "latest.md").write_text(md)
    print(md)
    if readme:
        from mnist_opt.errors import MnistOptError
        from mnist_opt.textblocks import replace_between

        try:
            replace_between(ROOT / "README.md", README_START, README_END,
                            "\n".join(["", table, "", *[f"{n}\n" for n in notes],
                                       "Verdicts (Mann–Whitney U, α = 0.05):", "", *verdicts,
                                       ""]))
        except MnistOptError as exc:
            print(exc, file=sys.stderr)
            return 1
        print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
