"""A study whose trials keep failing stops; a trial whose process died is failed on resume.

The counting rule on hand-built trials, then real studies: real Optuna, MLflow and Keras,
and a real ``kill -9``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.errors import StudyFailedError
from mnist_opt.search import objective
from mnist_opt.search.objective import failure_streak
from mnist_opt.search.runner import check_owners, run_study
from mnist_opt.study.config import load_config
from mnist_opt.tracking.storage import fail_dead_owners, make_storage, owner_gone
from conftest import POISON
from test_faults import _study_file, _trials, _wait_for

ROOT = Path(__file__).resolve().parent.parent
TS = optuna.trial.TrialState
T0 = datetime(2026, 12, 1, 12, 0)


def _trial(number: int, state: TS, second: int | None, reason: str | None = None):
    """A finished trial ``number`` that completed ``second`` seconds after T0."""
    trial = optuna.trial.create_trial(
        state=state, value=0.9 if state == TS.COMPLETE else None,
        user_attrs={"fail_reason": reason} if reason else {})
    trial.number = number
    trial.datetime_complete = None if second is None else T0 + timedelta(seconds=second)
    return trial


def _numbers(trials) -> list[int]:
    return [t.number for t in trials]


# --- the rule: failed trials in a row, in completion order ---------------------------------

def test_three_failures_in_completion_order_not_in_trial_order():
    # by number: F F C F — no run of three; by completion: 0, 1, 3 fail before 2 completes
    trials = [_trial(0, TS.FAIL, 1, "ValueError: x"), _trial(1, TS.FAIL, 2, "ValueError: x"),
              _trial(2, TS.COMPLETE, 9), _trial(3, TS.FAIL, 3, "ValueError: x")]
    assert _numbers(failure_streak(trials, 3)) == [0, 1, 3]
    # the same trials finishing in number order break the run
    trials[2].datetime_complete = T0 + timedelta(seconds=2, milliseconds=500)
    assert failure_streak(trials, 3) == []


def test_a_complete_or_pruned_trial_ends_a_run_of_failures():
    for ok in (TS.COMPLETE, TS.PRUNED):
        trials = [_trial(0, TS.FAIL, 0, "boom"), _trial(1, TS.FAIL, 1, "boom"), _trial(2, ok, 2),
                  _trial(3, TS.FAIL, 3, "boom"), _trial(4, TS.FAIL, 4, "boom")]
        assert failure_streak(trials, 3) == []
        assert _numbers(failure_streak(trials, 2)) == [0, 1]  # the first run, not the latest


def test_interrupted_and_stale_trials_neither_count_nor_break_a_run():
    skipped = [_trial(1, TS.FAIL, 1, "interrupted (Ctrl-C or SIGTERM)"),
               _trial(2, TS.FAIL, 2, "stale: process 123 on host is gone"),
               _trial(3, TS.FAIL, 3, "stale: no heartbeat for 30 s (worker killed or hung)")]
    trials = [_trial(0, TS.FAIL, 0, "boom"), *skipped, _trial(4, TS.FAIL, 4, "boom")]
    assert failure_streak(trials, 3) == []
    assert _numbers(failure_streak([*trials, _trial(5, TS.FAIL, 5)], 3)) == [0, 4, 5]


def test_once_reached_a_later_completion_does_not_revive_the_study():
    trials = [_trial(n, TS.FAIL, n, "boom") for n in range(3)] + [_trial(3, TS.COMPLETE, 3)]
    assert _numbers(failure_streak(trials, 3)) == [0, 1, 2]


def test_unfinished_trials_are_ignored_and_a_failure_without_reason_counts():
    running = optuna.trial.create_trial(state=TS.RUNNING)
    running.number = 1
    waiting = optuna.trial.create_trial(state=TS.WAITING)
    waiting.number = 2
    trials = [_trial(0, TS.FAIL, 0), running, waiting, _trial(3, TS.FAIL, 3)]
    assert _numbers(failure_streak(trials, 2)) == [0, 3]
    assert failure_streak(trials, 3) == []


# --- owners: a trial whose process is gone is failed at once, on its own host --------------

@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() without optimize(), on purpose
def test_a_running_trial_of_a_dead_process_on_this_host_is_failed_and_requeued(tmp_path):
    study = optuna.create_study(study_name="owners",
                                storage=make_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    me = psutil.Process()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {  # trial number: its recorded owner
        0: {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time()},
        1: {"host": socket.gethostname(), "pid": dead.pid, "pid_started": 0.0},
        2: {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time() - 9},
        3: {"host": "elsewhere", "pid": dead.pid, "pid_started": 0.0},
        4: {}}
    for attrs in owners.values():
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    # alive; gone; pid reused by another process (this one); another host; owner unknown
    assert [owner_gone(t) for t in study.get_trials()] == [False, True, True, False, False]
    assert fail_dead_owners(study) == [1, 2]
    trials = study.get_trials()
    assert [t.state for t in trials[:5]] == [TS.RUNNING, TS.FAIL, TS.FAIL, TS.RUNNING,
                                             TS.RUNNING]
    assert trials[1].user_attrs["fail_reason"] == (f"stale: process {dead.pid} on "
                                                   f"{socket.gethostname()} is gone")
    queued = trials[5:]
    assert [t.state for t in queued] == [TS.WAITING, TS.WAITING]
    assert [t.system_attrs["failed_trial"] for t in queued] == [1, 2]
    assert [t.params for t in queued] == [trials[1].params, trials[2].params]
    # the copy does not inherit the dead owner (it would be failed as soon as it starts)
    assert all(not {"host", "pid", "fail_reason"} & t.user_attrs.keys() for t in queued)
    assert fail_dead_owners(study) == []  # nothing twice


def test_a_process_killed_while_the_sampler_works_leaves_an_owned_trial(tmp_path):
    """The owner is recorded when the trial is created (study.ask), not when the objective
    starts: a process that dies inside ask() — GP sampling takes seconds — is seen as gone."""
    url = f"sqlite:///{tmp_path / 'ask.db'}"
    optuna.create_study(study_name="ask", storage=make_storage(url))
    code = ("import os, optuna; from mnist_opt.tracking.storage import make_storage; "
            f"s = optuna.load_study(study_name='ask', storage=make_storage({url!r})); "
            "s.ask(); os._exit(9)")  # dies before any objective could run
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    study = optuna.load_study(study_name="ask", storage=make_storage(url))
    (trial,) = study.get_trials()
    assert trial.state == TS.RUNNING and trial.user_attrs["host"] == socket.gethostname()
    assert owner_gone(trial)
    assert fail_dead_owners(study) == [0]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_no_success_while_a_trial_is_running_with_no_live_owner(tmp_path):
    study = optuna.create_study(study_name="orphan",
                                storage=make_storage(f"sqlite:///{tmp_path / 'r.db'}"))
    trial = study.ask()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": 0.0}  # pid reused
    for key, value in owner.items():
        trial.set_user_attr(key, value)
    with pytest.raises(StudyFailedError, match="trial 0 is still RUNNING but its process"):
        check_owners(study)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_heartbeat_stale_trial_is_marked_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_OPT_HEARTBEAT", "1")
    monkeypatch.setenv("MNIST_OPT_GRACE", "1")
    study = optuna.create_study(study_name="beats",
                                storage=make_storage(f"sqlite:///{tmp_path / 'b.db'}"))
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)  # and then nothing: the worker died
    time.sleep(2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    stale = study.get_trials()[0]
    assert stale.state == TS.FAIL
    assert stale.user_attrs["fail_reason"].startswith("stale: no heartbeat")
    assert not objective.counts_as_failure(stale)


# --- real studies ------------------------------------------------------------------------

def _run(path: Path, cwd: Path, *extra: str, env: dict[str, str] | None = None):
    # one process: these tests are about what one process leaves behind (-w overrides it)
    return subprocess.run([sys.executable, "-m", "mnist_opt", "study", str(path), "-q", "-w", "1",
                           *extra],
                          cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_study_whose_trials_all_fail_stops_after_three_and_exits_1(stores, tmp_path,
                                                                     poisoned_env):
    path = _study_file(tmp_path, "broken", search={"n_trials": 8},
                       space={"activation": POISON})
    proc = _run(path, tmp_path, env=poisoned_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    trials = _trials(stores["storage"], "broken")
    assert [t.state for t in trials] == [TS.FAIL] * 3  # not the 8 asked for
    assert "stopped; study broken: 0 complete, 0 pruned, 3 failed trials" in out
    assert "3 trials failed in a row (trials 0, 1, 2; search.max_consecutive_failures=3)" in out
    assert f"last failed trial 2: {trials[2].user_attrs['fail_reason']}" in out
    assert "injected failure" in trials[2].user_attrs["fail_reason"]
    last_line = trials[2].user_attrs["traceback"].rstrip().splitlines()[-1]
    assert f"  {last_line}" in out  # the traceback's tail
    assert "next: make retrain" not in out
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    parent = [r for r in runs if r.data.tags["mnist_opt.kind"] == "study"]
    assert [p.info.status for p in parent] == ["FAILED"]
    assert all(r.info.status == "FAILED" for r in runs)


@pytest.mark.e2e
@pytest.mark.slow
def test_an_invocation_with_no_finished_trial_because_of_failures_fails(stores, tmp_path,
                                                                        monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the builder is broken")

    monkeypatch.setattr(objective, "fresh_model", broken)
    cfg = load_config(_study_file(tmp_path, "short", search={"n_trials": 2}))
    with pytest.raises(StudyFailedError, match="no trial finished in this run: 2 failed") as info:
        run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert info.value.trial.number == 1
    assert "the builder is broken" in info.value.trial.user_attrs["traceback"]
    trials = _trials(stores["storage"], "short")
    assert [t.state for t in trials] == [TS.FAIL, TS.FAIL]


@pytest.mark.e2e
@pytest.mark.slow
def test_workers_are_not_replaced_once_the_study_stopped_for_failures(stores, tmp_path,
                                                                     poisoned_env):
    # each worker process runs one trial: without the parent's check, it would start 8
    path = _study_file(tmp_path, "broken_workers",
                       search={"n_trials": 8, "trials_per_worker": 1},
                       space={"activation": POISON})
    proc = _run(path, tmp_path, "--workers", "2", env=poisoned_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    trials = _trials(stores["storage"], "broken_workers")
    assert 3 <= len(trials) <= 4 and all(t.state == TS.FAIL for t in trials), out[-3000:]
    assert "3 trials failed in a row" in out


def _resume_study_file(tmp_path: Path) -> Path:
    """studies/mlp_random.yaml without its pruner."""
    doc = yaml.safe_load((ROOT / "studies" / "mlp_random.yaml").read_text())
    doc["search"]["pruner"] = "none"
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_then_resume_at_once_fails_the_killed_trial(stores, tmp_path):
    path = _resume_study_file(tmp_path)
    # a grace period longer than the test: only the dead-owner check can fail the trial
    env = {**os.environ, "MNIST_OPT_HEARTBEAT": "10", "MNIST_OPT_GRACE": "600"}
    command = [sys.executable, "-m", "mnist_opt", "study", str(path), "-q", "-w", "1",
               "--n-trials", "3",
               "--train-subset", "1000", "--max-epochs", "3"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def trial_1_running() -> bool:
        trials = _trials(stores["storage"], "resume")
        return (len(trials) > 1 and trials[1].state == TS.RUNNING
                and "mlflow_run_id" in trials[1].user_attrs)

    _wait_for(trial_1_running, "trial 1 running", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    killed = _trials(stores["storage"], "resume")[1]
    assert killed.user_attrs["pid"] == proc.pid and killed.state == TS.RUNNING
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "trial 1 was left RUNNING by a process that is gone" in out
    after = _trials(stores["storage"], "resume")
    assert after[1].state == TS.FAIL
    assert after[1].user_attrs["fail_reason"].startswith(f"stale: process {proc.pid} on ")
    assert not [t.number for t in after if t.state == TS.RUNNING]
    assert sum(t.state in (TS.COMPLETE, TS.PRUNED) for t in after) == 3
    retried = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].state == TS.COMPLETE and retried[0].user_attrs["pid"] != proc.pid
    client = MlflowClient()
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["fail_reason"].startswith("stale:")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trial_failed_as_stale_between_its_run_s_end_and_optuna_s_tell_is_dropped(
        stores, tmp_path, monkeypatch, capsys):
    """Another worker fails this worker's trial as stale (a link cut, an outage) after the
    trial's MLflow run ended FINISHED and before Optuna tells it: the worker drops the trial
    (its run re-closed KILLED: never a FINISHED run for a failed trial) and goes on; the
    re-queued copy completes, and the study still ends with its target."""
    import mlflow

    from mnist_opt.tracking.storage import _mark_stale, _on_stale_trial

    real_end_run, hit = mlflow.end_run, []

    def end_then_failed_elsewhere(status: str = "FINISHED") -> None:
        real_end_run(status)
        other = make_storage(stores["storage"])  # the other worker's own connection
        study = optuna.load_study(study_name="window", storage=other)
        running = study.get_trials(deepcopy=False, states=(TS.RUNNING,))
        if status == "FINISHED" and running and not hit:
            tid = running[0]._trial_id
            assert _mark_stale(other, tid, "stale: no heartbeat (injected)")
            other.set_trial_state_values(tid, TS.FAIL)
            _on_stale_trial(study, other.get_trial(tid))
            hit.append(running[0].number)

    monkeypatch.setattr(mlflow, "end_run", end_then_failed_elsewhere)
    cfg = load_config(_study_file(tmp_path, "window", search={"n_trials": 2}))
    run_study(cfg, stores["storage"], verbose=False, progress=False)
    out = capsys.readouterr()
    assert hit == [0]
    trials = _trials(stores["storage"], "window")
    assert [t.state for t in trials] == [TS.FAIL, TS.COMPLETE, TS.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert "trial 0 was failed as stale by another worker" in out.out + out.err
    assert "Traceback" not in out.out + out.err
    client = MlflowClient()
    run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["fail_reason"].startswith("stale")
    for trial in trials[1:]:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
