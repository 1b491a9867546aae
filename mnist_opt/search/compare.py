"""``mnist-opt compare``: run every repeat of every strategy, one at a time, each in its own
process under the same budget and number of workers; then compare them by time to target
(:mod:`mnist_opt.reporting.time_to_target`) and write the curves, the table and the verdict.

Each repeat is its own Optuna study in the study's storage, ``NAME.cmp.SAMPLER-PRUNER.rR``,
created here before its process starts (a fresh SQLite file must not be created by two
processes at once), with the user attrs the statistics read:

* ``compare_strategy`` (``"tpe+hyperband"``), ``compare_repeat`` (R);
* ``compare_clock_start``: ``time.time()`` just before the repeat's process was started, so
  its start-up and data loading count, as they will for keras-tuner;
* ``compare_setup``: what it searched, its budget and worker count, so a rerun with another
  budget does not mix repeats silently; ``compare_owner`` / ``compare_process``: the compare
  process and the repeat's process (host, pid, start time);
* ``compare_finished`` (true) and ``compare_wall_s``, once its process exited with status 0.

Rerunning the same command continues: finished repeats are kept; a repeat that was started
but not finished (the compare process was killed) is deleted, its MLflow runs left RUNNING are
closed, and it runs again from scratch, with a new clock. A repeat's process dies with the
compare process (Linux: ``PR_SET_PDEATHSIG``), so a killed compare leaves no repeat running.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from mnist_opt import interrupt
from mnist_opt.data import provenance
from mnist_opt.errors import MnistOptError, StudyFailedError
from mnist_opt.reporting.machine import code_version, describe
from mnist_opt.reporting.trial_cost import epochs_trained
from mnist_opt.reporting.time_to_target import (default_target, markdown_table, pair_verdicts,
                                                plot_curves, repeat_result, study_epochs,
                                                summary)
from mnist_opt.search.strategies import Budget, Repeat, write_study_file
from mnist_opt.study.config import StudyConfig, section_changes
from mnist_opt.study.objectives import PROMOTED
from mnist_opt.tracking import runs as tracking
from mnist_opt.tracking.storage import make_storage, owner_attrs, process_gone

FINISHED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
# the budget stops the search; search.promote's re-training comes after it, on the clock
PROMOTION_NOTE = ("- promotion: `search.promote` re-trains the top configurations on all "
                  "training images after the budget ran out, in the repeat's process: its "
                  "epochs count in the curves, time and epochs to target and wall s, so the "
                  "promoting strategies spend more than the budget")


class CompareBusyError(MnistOptError):
    """A repeat is still being run by a live process (another compare of the same study)."""


class CompareChangedError(MnistOptError):
    """Finished repeats were run with another budget, override or worker count."""


@dataclass
class Outcome:
    """What ``compare`` found and wrote."""
    rows: list[dict[str, Any]]
    verdict: list[str]
    table: str
    target: float
    target_source: str
    folder: Path
    files: list[Path]
    run_id: str


def compare(cfg: StudyConfig, plan: list[Repeat], budget: Budget, workers: int, storage: str,
            target: float | None, command: str, folder: Path, verbose: bool = False,
            retrain: bool = False) -> Outcome:
    """Run the repeats of ``plan`` that are not finished yet, then report on all of them;
    with ``retrain``, first score each repeat's best configuration on the test set.

    Raises :class:`StudyFailedError` when a repeat's process fails (the rerun redoes it) and
    ``KeyboardInterrupt`` on Ctrl-C / SIGTERM (passed on to the repeat's process first).
    """
    opened = make_storage(storage)  # created here, before any repeat's process opens it
    _check_setups(plan, workers, opened)
    tracking.open_experiment(f"compare-{cfg.name}")
    params = {"study": cfg.name, "strategies": " ".join(dict.fromkeys(
                  r.strategy.label for r in plan)),
              "repeats": max(r.index for r in plan) + 1, "budget_seconds": budget.seconds,
              "budget_epochs": budget.epochs, "budget_trials": budget.trials,
              "workers": workers, "storage": storage, "retrain": retrain,
              "max_epochs": plan[0].config.training.max_epochs,
              "train_subset": plan[0].config.data.train_subset, "target_given": target}
    with tracking.compare_run(cfg.name, params) as parent:
        mlflow.set_tag("mnist_opt.command", command)
        todo = [r for r in plan if not _finished(opened, r.name)]
        if len(todo) < len(plan):
            print(f"{len(plan) - len(todo)} of {len(plan)} repeats finished earlier: kept "
                  f"({', '.join(r.name for r in plan if r not in todo)})", flush=True)
        for count, repeat in enumerate(todo, 1):
            print(f"[{count}/{len(todo)}] {repeat.strategy.label} repeat {repeat.index} "
                  f"(seed {repeat.seed}): study {repeat.name}", flush=True)
            _run_repeat(repeat, opened, storage, workers, parent.info, folder, verbose)
        if retrain:
            _retrain(plan, opened)
        return _report(cfg, plan, opened, budget, workers, storage, target, command, folder,
                       parent.info.run_id)


def _study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _finished(storage: optuna.storages.BaseStorage, name: str) -> bool:
    study = _study(storage, name)
    return study is not None and study.user_attrs.get("compare_finished") is True


def _setup(repeat: Repeat, workers: int) -> dict[str, Any]:
    """What makes repeats comparable: what they search (the study's normalised search
    section, seed included), their budget and their worker count; not the file's texts."""
    search = repeat.config.search
    return {"search": repeat.config.search_section(), "timeout": search.timeout,
            "epoch_budget": search.epoch_budget, "n_trials": search.n_trials, "workers": workers}


def _check_setups(plan: list[Repeat], workers: int,
                  storage: optuna.storages.BaseStorage) -> None:
    """Refuse to add repeats to finished ones that ran with another setup (budget, overrides,
    workers, the study file's space): the comparison would mix them silently."""
    changed = []
    for repeat in plan:
        study = _study(storage, repeat.name)
        if study is None or study.user_attrs.get("compare_finished") is not True:
            continue
        old = study.user_attrs.get("compare_setup")
        diff = section_changes(old, _setup(repeat, workers)) if old else ["(not recorded)"]
        if diff:
            changed.append(f"{repeat.name}: {'; '.join(diff)}")
    if changed:
        names = " ".join(c.split(":")[0] for c in changed)
        raise CompareChangedError(
            "finished repeats ran with another setup than this command's:\n" + "\n".join(changed)
            + "\nrun the command they ran with, or delete them to redo them: for each, "
            f"optuna delete-study --storage URL --study-name NAME ({names})")


def _alive_here(owner: dict | None) -> bool:
    """A process :func:`owner_attrs` described that still runs on this host. (Another
    host's cannot be checked: it counts as gone.)"""
    return bool(owner) and owner.get("host") == socket.gethostname() and not process_gone(owner)


def _redo(study: optuna.Study, storage: optuna.storages.BaseStorage, experiment: str) -> None:
    """Delete a repeat that was started but not finished, after closing its MLflow runs."""
    attrs = study.user_attrs
    for key in ("compare_owner", "compare_process"):
        owner = attrs.get(key)
        if _alive_here(owner) and owner.get("pid") != os.getpid():
            raise CompareBusyError(
                f"repeat {study.study_name} is being run by process {owner['pid']} (another "
                "`mnist-opt compare` of this study?): wait for it to end, or stop it, then rerun")
    trials = study.get_trials(deepcopy=False)
    busy = [t for t in trials
            if t.state == optuna.trial.TrialState.RUNNING and _alive_here(t.user_attrs)]
    if busy:
        raise CompareBusyError(
            f"repeat {study.study_name} still has trials running in process(es) "
            f"{', '.join(sorted({str(t.user_attrs['pid']) for t in busy}))}: wait for them to "
            "end, or stop them, then rerun")
    closed = 0
    for run in MlflowClient().search_runs(
            [experiment], f"attributes.status = 'RUNNING' and "
                          f"tags.`optuna.study_name` = '{study.study_name}'"):
        closed += tracking.close_run(run.info.run_id, "KILLED",
                                     {"fail_reason": "compare repeat killed mid-way; run again"})
    optuna.delete_study(study_name=study.study_name, storage=storage)
    print(f"  {study.study_name} was started but not finished (killed mid-way?): deleted "
          f"({len(trials)} trials, {closed} MLflow runs left RUNNING closed as KILLED) and run "
          "again from scratch", flush=True)


def _die_with_parent(parent: int):
    """For Popen's preexec_fn: the repeat's process gets SIGKILL when the compare process
    dies, so a ``kill -9``ed compare leaves no repeat behind to race its rerun (Linux)."""

    def preexec() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec if sys.platform.startswith("linux") else None


def _run_repeat(repeat: Repeat, storage: optuna.storages.BaseStorage, url: str, workers: int,
                parent: mlflow.entities.RunInfo, folder: Path, verbose: bool) -> None:
    """Create the repeat's study, start its process, wait for it; mark it finished on 0."""
    old = _study(storage, repeat.name)
    if old is not None:
        _redo(old, storage, parent.experiment_id)
    study_file = write_study_file(repeat)
    study = optuna.create_study(study_name=repeat.name, storage=storage,
                                directions=repeat.config.directions)
    for key, value in {"compare_strategy": repeat.strategy.label, "compare_repeat": repeat.index,
                       "compare_setup": _setup(repeat, workers),
                       "compare_owner": owner_attrs(), "compare_code": code_version()}.items():
        study.set_user_attr(key, value)
    log = folder / "logs" / f"{repeat.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, tracking.PARENT_RUN_ENV: parent.run_id,
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    command = repeat.strategy.command(study_file, url, workers, verbose)
    with open(log, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        clock = time.time()  # the clock starts when the tool's process starts
        # its own process group: a Ctrl-C at the terminal reaches it once, passed on below
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                process_group=0, preexec_fn=_die_with_parent(os.getpid()))
    study.set_user_attr("compare_clock_start", clock)
    with contextlib.suppress(Exception):  # it may be gone already
        study.set_user_attr("compare_process", owner_attrs(proc.pid))
    code = _wait(proc)
    wall = time.time() - clock
    if code != 0:
        tail = "\n".join(f"  {line}" for line in log.read_text().splitlines()[-15:])
        raise StudyFailedError(f"repeat {repeat.name} exited with status {code} after {wall:.0f} "
                               f"s (log: {log}):\n{tail}\nfix it, then run the same command "
                               "again: finished repeats are kept, this one is redone")
    study.set_user_attr("compare_wall_s", wall)
    study.set_user_attr("compare_finished", True)
    print(f"  {_line(study)}, {wall:.1f} s (log: {log})", flush=True)


def best_params(study: optuna.Study) -> tuple[int, dict[str, Any]] | None:
    """The trial with the highest validation accuracy of any completed epoch (the statistic
    the curves use, read by the same :func:`study_epochs`, for every tool and whatever became
    of the trial; a promoted trial's full-data re-training counts as its own; the earliest
    trial on a tie) and its params."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    scored = [e for e in study_epochs(study) if e.accuracy is not None]
    if not scored:
        return None
    best = trials[max(scored, key=lambda e: (e.accuracy, -e.trial)).trial]
    return best.number, best.params


def _retrain(plan: list[Repeat], storage: optuna.storages.BaseStorage) -> None:
    """Score each repeat's best configuration on the test set, as ``retrain`` trains it (all
    training images, ``retrain_epochs``, the repeat's seed); kept in the repeat's study
    (``compare_test_accuracy``), so a rerun does not train it again. Outside every clock."""
    from mnist_opt.training.retrain import score_on_test

    for repeat in plan:
        study = optuna.load_study(study_name=repeat.name, storage=storage)
        found = best_params(study)
        if "compare_test_accuracy" in study.user_attrs or found is None:
            continue
        number, params = found
        accuracy = score_on_test(repeat.config, params, repeat.seed)
        study.set_user_attr("compare_test_trial", number)
        study.set_user_attr("compare_test_accuracy", accuracy)
        print(f"  {repeat.name}: trial {number} retrained, test accuracy {accuracy:.4f}",
              flush=True)


def _wait(proc: subprocess.Popen) -> int:
    """The process's exit status; on Ctrl-C / SIGTERM, pass it on, wait, and raise."""
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                interrupt.check()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # it stops after its current batch
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _line(study: optuna.Study) -> str:
    """``12 trials (5 complete, 7 pruned, 0 failed), 20 epochs``: a finished repeat; ``, 3
    promoted (30 epochs)`` after it when ``search.promote`` re-trained some."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    epochs = sum(epochs_trained(t) for t in trials)
    promoted = study.user_attrs.get(PROMOTED) or {}
    again = sum(p.get("epochs", 0) for p in promoted.values())
    return (f"{len(trials)} trials ({states.count('complete')} complete, "
            f"{states.count('pruned')} pruned, {states.count('fail')} failed), {epochs:g} epochs"
            + (f", {len(promoted)} promoted ({again:g} epochs)" if promoted else ""))


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (strict readers refuse them): None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _target(given: float | None, folder: Path, results: list) -> tuple[float, str]:
    """The target and where it came from: given; else the previous compare run's (its
    summary.json), fixed before this run; else — the first run — this run's default target,
    which is chosen after the fact and said so."""
    if given is not None:
        return given, "--target"
    previous = folder / "summary.json"
    if previous.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return (float(json.loads(previous.read_text())["target"]),
                    f"the previous compare run's target ({previous}), fixed before this run")
    return default_target(results), (
        "default_target: the lowest median final best of the strategies, computed from this "
        "first run, so chosen after the fact; the next run uses it as a fixed target, or give "
        "--target")


def _ran(studies: list[optuna.Study]) -> str:
    """When the repeats ran: the first one's process start to the last one's exit (UTC)."""
    spans = [(a["compare_clock_start"], a["compare_clock_start"] + a["compare_wall_s"])
             for a in (s.user_attrs for s in studies)
             if "compare_clock_start" in a and "compare_wall_s" in a]
    if not spans:
        return "unknown"
    shown = [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
             for t in (min(a for a, _ in spans), max(b for _, b in spans))]
    return " to ".join(shown)


def _codes(studies: list[optuna.Study]) -> str:
    """The code each repeat ran (recorded as it started), with how many repeats each."""
    codes = [s.user_attrs.get("compare_code", "not recorded") for s in studies]
    return ", ".join(f"{c} ({codes.count(c)} repeat{'s' * (codes.count(c) != 1)})"
                     for c in dict.fromkeys(codes))


def _report(cfg: StudyConfig, plan: list[Repeat], storage: optuna.storages.BaseStorage,
            budget: Budget, workers: int, url: str, target: float | None, command: str,
            folder: Path, run_id: str) -> Outcome:
    """Curves, table and verdict of every repeat, from the storage: written to ``folder``
    and logged to the compare run."""
    studies = [optuna.load_study(study_name=r.name, storage=storage) for r in plan]
    results = [repeat_result(study) for study in studies]
    target, source = _target(target, folder, results)
    rows = [dict(row) for row in summary(results, target)]
    pairs = pair_verdicts(results, target)
    lines = [p["verdict"] for p in pairs]
    table = markdown_table(rows)
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(results, folder, target=target)
    repeats = max(r.index for r in plan) + 1
    machine = describe()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ran, code, data = _ran(studies), _codes(studies), provenance(cfg.dataset)
    # each repeat's epochs, so that the report can be recomputed without the storage
    details = [{"study": r.name, "strategy": r.strategy.label, "repeat": r.index, "seed": r.seed,
                "wall_s": s.user_attrs.get("compare_wall_s"), "trials": _line(s),
                "study_file": str(r.study_file),
                "test_accuracy": s.user_attrs.get("compare_test_accuracy"),
                "epoch_log": [[round(e.time - s.user_attrs["compare_clock_start"], 3),
                               e.accuracy, e.trial]
                              for e in study_epochs(s)]}
               for r, s in zip(plan, studies)]
    md = folder / "summary.md"
    md.write_text("\n".join([
        f"# Comparing strategies on {cfg.name}", "",
        f"- command: `{command}`", f"- machine: {machine}",
        f"- ran: {ran} (repeats' first start to last end); reported: {date}; code: {code}",
        f"- budget: {budget}; {workers} worker process{'es' * (workers != 1)} per repeat",
        *([PROMOTION_NOTE] if any(s.user_attrs.get(PROMOTED) for s in studies) else []),
        f"- repeats: {repeats} per strategy, seeds {cfg.search.seed}…"
        f"{cfg.search.seed + repeats - 1} (the same for every strategy), one repeat at a time",
        f"- data: {data}, train_subset {plan[0].config.data.train_subset}, "
        f"≤{plan[0].config.training.max_epochs} epochs per trial",
        f"- target: validation accuracy {target:.4f} ({source})",
        f"- storage: {url}; MLflow: experiment compare-{cfg.name}, run {run_id}", "",
        "## Table", "", table.rstrip("\n"), "",
        "## Verdict", "", *([f"- {line}" for line in lines] or
                            ["- one strategy: nothing to compare it with here"]), "",
        "## Curves", "", *[f"- [{p.name}]({p.name})" for p in plots], "",
        "## Repeats", "", "(wall s: from the repeat's process start to its exit; its epochs "
        "are in summary.json)", "",
        "| study | strategy | repeat | seed | trials | wall s |",
        "|---|---|---|---|---|---|",
        *[f"| {d['study']} | {d['strategy']} | {d['repeat']} | {d['seed']} | {d['trials']} | "
          f"{d['wall_s']:.1f} |" if d["wall_s"] is not None else
          f"| {d['study']} | {d['strategy']} | {d['repeat']} | {d['seed']} | {d['trials']} | ? |"
          for d in details], ""]))
    js = folder / "summary.json"
    js.write_text(json.dumps(_clean({
        "study": cfg.name, "command": command, "machine": machine, "date": date, "ran": ran,
        "code": code, "data": data,
        "budget": {"seconds": budget.seconds, "epochs": budget.epochs, "trials": budget.trials},
        "workers": workers,
        "repeats": repeats, "target": target, "target_source": source, "storage": url,
        "mlflow_run_id": run_id, "rows": rows, "verdict": lines, "pairs": pairs,
        "repeat_studies": details,
        "plots": [p.name for p in plots]}), indent=2) + "\n")
    files = [md, js, *plots]
    for path in files:
        mlflow.log_artifact(str(path))
    for repeat in plan:  # this comparison's repeats, not others' of the same study
        if not repeat.study_file.exists():  # reports/ deleted since: the same file again
            write_study_file(repeat)
        mlflow.log_artifact(str(repeat.study_file), "studies")
        log = folder / "logs" / f"{repeat.name}.log"
        if log.exists():  # not for repeats finished by an earlier invocation that lost it
            mlflow.log_artifact(str(log), "logs")
    mlflow.log_param("target", target)
    mlflow.log_metric("target", target)
    for row in rows:
        slug = row["strategy"].replace("+", "-")
        mlflow.log_metrics({f"{slug}.{key}": float(value) for key, value in row.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)
                            and key != "target" and math.isfinite(value)})
    return Outcome(rows, lines, table, target, source, folder, files, run_id)
