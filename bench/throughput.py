"""Trials and epochs per second of ``mnist-opt study``: one worker, every core, and what a
worker process's replacement costs.

    python bench/throughput.py             # 3 rounds (make bench-throughput)
    python bench/throughput.py --render    # only rewrite throughput.md and the README section
    python bench/throughput.py --full      # make study NAME=mlp_tpe as shipped: 1 worker vs
                                           # every core, 3 alternating pairs (make bench-speedup)

Each run is the command a user types, timed from its process start to its exit:
``mnist-opt study mlp_tpe --workers K --n-trials 30 --max-epochs 4`` on the full training set,
in a fresh storage. Three settings, in a rotated order in each round so that none always runs
first or last:

* ``1 worker``: the trials in the command's own process;
* ``N workers, replaced every 6 trials``: every usable core (``--workers auto``), each worker
  process replaced after 6 trials, the default before it was measured here;
* ``N workers, replaced every T trials``: the same with the study file's default
  ``search.trials_per_worker``.

Per run: wall seconds, trial-epochs per second (epochs trained by all trials, a pruned
trial's fraction included, over the wall time), the per-trial fixed cost and the worker time
spent outside any trial while trials are still to start
(:mod:`mnist_opt.reporting.trial_cost`), and the best validation
accuracy. Everything goes to ``bench/results/throughput.json``; ``throughput.md`` and the
README's section are generated from it.

``--full`` answers "how much sooner does ``make study NAME=mlp_tpe`` finish on every core?":
the shipped study file as it is (its ``n_trials`` and ``max_epochs``), with ``--workers 1``
and ``--workers auto``'s count, in alternating order, one pair per round; the headline is the
median over pairs of the wall-time ratio (every core / one worker), beside the best
validation accuracy and the epochs each run trained. Into ``bench/results/speedup.json``,
``speedup.md`` and the README's speedup section.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import _cell, _shown, _spread

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_START, README_END = "<!-- throughput:start -->", "<!-- throughput:end -->"
FULL_START, FULL_END = "<!-- speedup:start -->", "<!-- speedup:end -->"
STUDY, TRIALS, EPOCHS = "mlp_tpe", 30, 4
BEFORE = 6  # trials per worker process before this bench measured the replacement's cost


def settings(workers: int, default: int) -> dict[str, tuple[int, int | None]]:
    """label → (worker processes, trials per worker; None: the study file's default)."""
    return {"1 worker": (1, None),
            f"{workers} workers, replaced every {BEFORE} trials": (workers, BEFORE),
            f"{workers} workers, replaced every {default} trials": (workers, None)}


def full_settings(workers: int) -> dict[str, tuple[int, int | None]]:
    """``--full``: one worker and every core, both with the study file as shipped."""
    return {"1 worker": (1, None), f"{workers} workers": (workers, None)}


def study_file(work: Path, per_worker: int | None) -> Path:
    """The shipped study file, with ``trials_per_worker`` set when asked (a run-time key:
    the searched space and the study's digest are the same)."""
    import yaml

    from mnist_opt.study.config import find_study

    doc = yaml.safe_load(find_study(STUDY).path.read_text())
    if per_worker is not None:
        doc["search"]["trials_per_worker"] = per_worker
    path = work / f"{STUDY}_{per_worker or 'default'}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def command(path: Path, workers: int, db: Path, full: bool = False) -> list[str]:
    """The ``mnist-opt study`` command of one run (run from the repository root)."""
    return ["mnist-opt", "study", _shown(path), "--workers", str(workers),
            *([] if full else ["--n-trials", str(TRIALS), "--max-epochs", str(EPOCHS)]),
            "--storage", f"sqlite:///{_shown(db)}", "--quiet"]


def measure(path: Path, workers: int, db: Path, full: bool = False) -> dict:
    """Run one study to its trial target in a fresh storage; its figures."""
    import optuna

    from mnist_opt.reporting.trial_cost import epochs_trained, fixed_costs, outside_trials

    db.unlink(missing_ok=True)
    argv = command(path, workers, db, full)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnist_opt", *argv[1:]], cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=path.stem, storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    epochs = sum(epochs_trained(t) for t in trials)
    return {"wall_s": wall, "trials": len(trials), "epochs": epochs,
            "epochs_per_s": epochs / wall, "fixed_cost_s": fixed_costs(trials).median,
            "outside_s": outside_trials(trials, workers),
            "processes": len({t.user_attrs.get("pid") for t in trials}),
            "best_val": study.best_value}


def run(rounds: int, full: bool = False) -> dict:
    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()
    import optuna

    from mnist_opt.reporting.machine import code_version, describe
    from mnist_opt.search.cores import auto_workers
    from mnist_opt.study.config import SearchConfig, find_study
    from mnist_opt.training.backend import choose

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = ROOT / "bench" / "work" / "throughput"  # git-ignored
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    n = auto_workers().workers
    default = SearchConfig.model_fields["trials_per_worker"].default
    labels = full_settings(n) if full else settings(n, default)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for r in range(rounds):
        order = list(labels)[r % len(labels):] + list(labels)[:r % len(labels)]
        for label in order:
            workers, per_worker = labels[label]
            print(f"round {r + 1}/{rounds}: {label}", flush=True)
            runs[label].append(measure(study_file(work, per_worker), workers,
                                       work / f"run-{r}-{workers}-{per_worker}.db", full))
            print("  " + json.dumps(runs[label][-1]), flush=True)
    path = study_file(work, None)
    make = "make bench-speedup" if full else "make bench-throughput"
    flags = f"{' --full' if full else ''} --rounds {rounds}"
    return {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": describe(), "code": code_version(), "rounds": rounds, "workers": n,
            "backend": choose(find_study(STUDY))[1],  # what `auto` picks here, and why
            "command": f"{make} (python bench/throughput.py{flags})",
            "each_run": {label: shlex.join(command(path, w, work / "run.db", full))
                         for label, (w, _) in labels.items()},
            "settings": {label: {key: _spread([run[key] for run in rs]) for key in rs[0]}
                         for label, rs in runs.items()}}


def table(out: dict) -> str:
    rows = ["| setting | wall s | trial-epochs | trial-epochs / s | fixed cost per trial, s | "
            "worker time outside trials per trial, s | processes | best val |",
            "|---|---|---|---|---|---|---|---|"]
    for label, s in out["settings"].items():
        rows.append(f"| {label} | {_cell(s['wall_s'], 0)} | {_cell(s['epochs'], 0)} | "
                    f"{_cell(s['epochs_per_s'], 2)} | "
                    f"{_cell(s['fixed_cost_s'], 2)} | {_cell(s['outside_s'], 2)} | "
                    f"{_cell(s['processes'], 0)} | {_cell(s['best_val'], 4)} |")
    return "\n".join(rows)


def speedup(out: dict, target: float = 0.6, best: float = 0.982) -> str:
    """``--full``'s headline: every core's wall time over one worker's, pair by pair (round
    by round), and how many runs reached the best validation accuracy aimed at."""
    s = out["settings"]
    one, many = s["1 worker"], s[f"{out['workers']} workers"]
    ratios = [a / b for a, b in zip(many["wall_s"]["values"], one["wall_s"]["values"])]
    runs = [v for side in (one, many) for v in side["best_val"]["values"]]
    return (f"Wall time with {out['workers']} workers / with 1 worker, per pair: median "
            f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}; "
            f"{', '.join(f'{r:.2f}' for r in ratios)} in order; aimed at ≤ {target}). Best "
            f"validation accuracy ≥ {best} in {sum(v >= best for v in runs)} of {len(runs)} "
            "runs.")


def ratios(out: dict) -> str:
    """Each multi-worker setting's median trial-epochs per second over one worker's."""
    s = out["settings"]
    one = s["1 worker"]["epochs_per_s"]["median"]
    parts = [f"{label}: {v['epochs_per_s']['median'] / one:.2f}× one worker's trial-epochs "
             "per second" for label, v in s.items() if label != "1 worker"]
    return "; ".join(parts) + "."


def render_full(out: dict, readme: bool = True) -> int:
    text = "\n".join([
        f"Medians (min–max) over {out['rounds']} alternating pairs of `{out['command']}`, "
        f"{out['started']} to {out['finished']}, on {out['machine']}; code {out['code']}; "
        f"backend {out['backend']}. "
        f"Each pair: `{out['each_run']['1 worker']}` and the same with `--workers "
        f"{out['workers']}` (what `--workers auto` starts here), the study file as shipped "
        "(its trial target and epochs), timed from the process start to its exit.", "",
        table(out), "", speedup(out), ""])
    (RESULTS / "speedup.md").write_text("# make study NAME=mlp_tpe: 1 worker vs every core\n\n"
                                         + text)
    print(text)
    if readme:
        from mnist_opt.textblocks import replace_between

        replace_between(ROOT / "README.md", FULL_START, FULL_END, "\n" + text)
        print("updated README.md")
    return 0


def render(out: dict, readme: bool = True) -> int:
    text = "\n".join([
        f"Medians (min–max) over {out['rounds']} rounds of `{out['command']}`, "
        f"{out['started']} to {out['finished']}, on {out['machine']}. Each run: "
        f"`{out['each_run']['1 worker']}` and the same with `--workers {out['workers']}`, "
        f"{TRIALS} finished trials of at most {EPOCHS} epochs on the full training set, timed "
        "from the process start to its exit. One worker runs the trials in the command's own "
        "process with TensorFlow's default threads (every core); each of several workers is a "
        "process with one thread.", "",
        table(out), "", ratios(out), ""])
    (RESULTS / "throughput.md").write_text("# Throughput of mnist-opt study\n\n" + text)
    print(text)
    if readme:
        from mnist_opt.textblocks import replace_between

        replace_between(ROOT / "README.md", README_START, README_END, "\n" + text)
        print("updated README.md")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting (default 3)")
    parser.add_argument("--render", action="store_true",
                        help="only write the .md and the README section from the JSON")
    parser.add_argument("--full", action="store_true",
                        help="the shipped mlp_tpe study, 1 worker vs every core, in pairs")
    args = parser.parse_args()
    path = RESULTS / ("speedup.json" if args.full else "throughput.json")
    show = render_full if args.full else render
    if args.render:
        return show(json.loads(path.read_text()))
    out = run(args.rounds, args.full)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return show(out)


if __name__ == "__main__":
    sys.exit(main())
