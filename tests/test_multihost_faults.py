"""Faults between hosts, survived (issue 15, point 2), in the multi-host bench of
tests/hosts.py: a database host runs PostgreSQL and the MLflow tracking server as the README's
recipe sets them up, three worker hosts run one study with ``mnist-opt study --workers 1``.
Mid-study, a worker is SIGKILLed, PostgreSQL stops for less and for more than the heartbeat
grace period, the MLflow server is killed and restarted, and a worker's link is cut for longer
than the grace period.

After each: the study has exactly its target of finished trials; every COMPLETE trial has
exactly one FINISHED MLflow run with its model; no run is left RUNNING; a trial failed as
stale has its parameters run again, and its own run is not FINISHED; each worker reports the
fault in at most three lines, with no traceback.

The bench (hosts, PostgreSQL, MLflow server) is shared by the module's tests: each test runs
its own study on it. Needs root (``ip netns``); skipped only where ``unshare -n true`` fails.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from sqlalchemy.pool import NullPool

from hosts import BASE_PATH, Bench, LoopbackBench, MlflowServer, Postgres, bench_kind
from hosts import make_bench, stop_group
from hosts import recipe_env, tail

ROOT = Path(__file__).resolve().parent.parent
TS = optuna.trial.TrialState
WORKERS = ("w1", "w2", "w3")
MLFLOW_PASSWORD = "bench-workers-password"

pytestmark = [pytest.mark.skipif(bench_kind() is None, reason="not root: `unshare -n true` "
                                 "fails and PostgreSQL cannot run as its own user"),
              pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres]


def _study_doc(n_trials: int) -> str:
    """A tiny dense layer on 1,000 images for 30 short epochs: a trial writes to both stores
    at each epoch's end for several seconds, so a fault lands in the middle of one."""
    return yaml.safe_dump({
        "dataset": "mnist", "model": "mlp",
        "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000},
        "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "seed": 3},
        "training": {"max_epochs": 30},
        "space": {"n_layers": 1, "units": {"low": 16, "high": 32}}})



class Stack:
    """The shared bench: ``db`` (PostgreSQL ``pg``, MLflow ``server``), the worker hosts."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.db = bench.host("db")
        self.pg = Postgres(self.db).start()
        self.server = MlflowServer(self.db, self.pg).start()
        self.recipe = recipe_env(self.db.addr, MLFLOW_PASSWORD)  # the test process's
        self.server.add_user(self.recipe["MLFLOW_TRACKING_USERNAME"], MLFLOW_PASSWORD)
        self.workers = [bench.host(name) for name in WORKERS]
        self.seen = {w.name: w.reach(self.db, self.pg.port, self.server.port)
                     for w in self.workers}  # the db host's address, as each worker reaches it
        for w in self.workers:
            self.pg.pgpass(w.home / ".pgpass", self.seen[w.name])

    def env(self, heartbeat: int, grace: int, host, **extra: str) -> dict[str, str]:
        """Worker ``host``'s environment: the recipe's variables, heartbeats every
        ``heartbeat`` s and a trial stale after ``grace`` s (small, so that a test lasts
        minutes), and ``extra``."""
        return {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "PYTHONPATH": str(ROOT),
                "MNIST_OPT_DATA": os.environ["MNIST_OPT_DATA"], "TF_CPP_MIN_LOG_LEVEL": "2",
                "MNIST_OPT_HEARTBEAT": str(heartbeat), "MNIST_OPT_GRACE": str(grace),
                **recipe_env(self.seen[host.name], MLFLOW_PASSWORD), **extra}

    def start(self, name: str, n_trials: int, heartbeat: int, grace: int, **extra: str) -> list:
        """``mnist-opt study NAME`` on every worker host; the processes."""
        procs = []
        for w in self.workers:
            (w.home / f"{name}.yaml").write_text(_study_doc(n_trials))
            procs.append(w.popen([sys.executable, "-m", "mnist_opt", "study", f"{name}.yaml",
                                  "--workers", "1", "-q"],
                                 env=self.env(heartbeat, grace, w, **extra),
                                 log=f"study-{name}"))
        return procs

    def study(self, name: str) -> optuna.Study:
        # polled many times a test: without NullPool every call kept a pool of connections
        # open, and the module's tests together used up PostgreSQL's 100 (a CI run: "remaining
        # connection slots are reserved" in the 5th test)
        storage = optuna.storages.RDBStorage(self.pg.url("optuna"),
                                             engine_kwargs={"poolclass": NullPool})
        return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def stack():
    with make_bench(readonly=[os.environ["MNIST_OPT_DATA"], ROOT, sys.prefix]) as bench:
        yield Stack(bench)


@pytest.fixture
def as_worker(stack, monkeypatch):
    return _as_worker(stack, monkeypatch)


def _as_worker(stack: Stack, monkeypatch) -> Stack:
    """The test process reads both stores as a worker does (password file, credentials)."""
    monkeypatch.setenv("PGPASSFILE", str(stack.pg.pgpass(stack.bench.base / "test.pgpass")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.recipe["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    return stack


def _wait_until(what: str, check, timeout: float, procs=()):
    """``check()``'s first truthy value, polled; fails after ``timeout`` s or when one of
    ``procs`` exits first (with its log)."""
    end = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        for proc in procs:
            assert proc.poll() is None, f"a worker exited before {what}:\n{tail(proc)}"
        assert time.monotonic() < end, f"no {what} within {timeout} s"
        time.sleep(0.3)


def _training(stack: Stack, name: str, host: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials (of worker ``host`` if given) that finished an epoch: mid-training."""
    try:
        trials = stack.study(name).get_trials(deepcopy=False, states=(TS.RUNNING,))
    except KeyError:  # the study is not created yet
        return []
    return [t for t in trials if t.user_attrs.get("epoch_log")
            and (host is None or stack.bench.hosts[host].ran(t))]


def _finish(procs, timeout: float = 900) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            stop_group(proc, grace=5)


def _check_end(stack: Stack, name: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly the target finished; every COMPLETE trial has exactly one FINISHED MLflow run
    with one model; no run RUNNING; a failed trial's run is not FINISHED. The trials."""
    trials = stack.study(name).trials
    states = [(t.number, t.state.name, t.user_attrs.get("host"), t.system_attrs.get("failed_trial"),
               t.user_attrs.get("fail_reason")) for t in trials]
    assert sum(t.state == TS.COMPLETE for t in trials) == n_trials, states
    assert not any(t.state in (TS.RUNNING, TS.WAITING) for t in trials), states
    client = MlflowClient(stack.server.uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    models = client.search_logged_models(experiment_ids=[exp.experiment_id], max_results=1000)
    by_trial: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("mnist_opt.kind") == "trial":
            by_trial.setdefault(run.data.tags["trial_number"], []).append(run)
    for trial in trials:
        mine = by_trial.get(str(trial.number), [])
        if trial.state == TS.COMPLETE:
            assert [(r.info.run_id, r.info.status) for r in mine] == \
                [(trial.user_attrs["mlflow_run_id"], "FINISHED")], trial.number
            assert sum(m.source_run_id == mine[0].info.run_id for m in models) == 1, trial.number
        else:  # a failed trial's run says so: never FINISHED
            assert [r.info.status for r in mine if r.info.status == "FINISHED"] == [], trial.number
    return trials


def _requeued(trials, failed: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The COMPLETE trial that ran ``failed``'s parameters again (Optuna's retry callback
    records where it came from), and the only COMPLETE one with them from that source."""
    again = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert [t.state for t in again] == [TS.COMPLETE], (failed.number, again)
    assert again[0].params == failed.params
    return again[0]


def _fault_report(procs, pattern: str, at_least: int = 1) -> dict[str, list[str]]:
    """Each worker's log lines that match ``pattern`` (how it reported the fault): at most
    three per worker, ``at_least`` in all, and no traceback anywhere."""
    lines = {}
    for proc in procs:
        text = Path(proc.log).read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]
        lines[proc.log.name] = [line for line in text.splitlines() if re.search(pattern, line)]
    assert all(len(found) <= 3 for found in lines.values()), lines
    assert sum(map(len, lines.values())) >= at_least, lines
    return lines


def test_a_sigkilled_worker_s_trial_is_failed_as_stale_and_run_again(as_worker):
    """(d) A worker's process is killed mid-trial (``kill -9``): another worker fails its
    trial once its heartbeat is older than the grace period, closes its run KILLED and
    queues its parameters again; the two others finish the study. (On the loopback bench
    every host has the machine's name, so a peer may also see the process gone; the
    heartbeat, checked first, still says it.)"""
    stack, name, n_trials = as_worker, "kill9", 4
    start = time.monotonic()
    procs = stack.start(name, n_trials, heartbeat=1, grace=4)
    victim = _wait_until("trial training on w1", lambda: _training(stack, name, "w1"), 600,
                         procs)[0]
    stop_group(procs[0], grace=0)  # SIGKILL to its process group: no handler runs
    _finish(procs[1:])
    for w, proc in zip(WORKERS[1:], procs[1:]):
        assert proc.returncode == 0, f"{w}:\n{tail(proc)}"
    # what only w1 can tell: its invocation's study run is RUNNING until w1 runs the study
    # again (no other host knows that the process is gone: MLflow runs have no heartbeat)
    client = MlflowClient(stack.server.uri)
    exp = client.get_experiment_by_name(name).experiment_id
    left = client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert [r.data.tags["mnist_opt.host"] for r in left] == [stack.workers[0].hostname], left
    again = stack.workers[0].run([sys.executable, "-m", "mnist_opt", "study", f"{name}.yaml",
                                  "--workers", "1", "-q"], env=stack.env(1, 4, stack.workers[0]),
                                 timeout=600)
    assert f"already has {n_trials} finished trials" in again.stdout, again.stdout[-3000:]
    trials = _check_end(stack, name, n_trials)
    killed = trials[victim.number]
    assert killed.state == TS.FAIL and killed.user_attrs["fail_reason"].startswith(
        "stale: no heartbeat"), killed.user_attrs
    _requeued(trials, killed)
    run = MlflowClient(stack.server.uri).get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["fail_reason"].startswith("stale")
    _fault_report(procs[1:], rf"trial {killed.number}\b")
    print(f"\nkill -9: study of {n_trials} trials in {time.monotonic() - start:.0f} s")


@pytest.mark.parametrize("outage", ["short", "long"])
def test_workers_ride_out_a_database_outage(as_worker, outage, monkeypatch):
    """(a) PostgreSQL stops mid-study (``pg_ctl stop -m fast``: every connection dropped)
    and starts again: for less than the grace period, or for more.

    Each worker's storage calls, its heartbeat thread and its study lock retry the lost
    connection with back-off (the MLflow server, whose runs live in the same PostgreSQL,
    answers 500 meanwhile and MLflow's client retries). After the long outage every running
    trial looks stale: the first process that reaches the database fails them and queues
    their parameters again. Here the test process is that process, and the workers' links are
    held down while it does (a few seconds), so that it reaches the database before their
    heartbeats do: otherwise who comes first is a race. The workers whose trials were failed
    under them drop their results (their runs end KILLED) and go on with the study."""
    stack, name, n_trials = as_worker, f"pg{outage}", 4
    heartbeat, grace, down = (2, 30, 20) if outage == "short" else (1, 8, 16)
    start = time.monotonic()
    procs = stack.start(name, n_trials, heartbeat, grace)
    running = _wait_until("3 trials training", lambda: len(_training(stack, name)) == 3 and
                          _training(stack, name), 600, procs)
    stack.pg.stop("fast")
    stopped = time.monotonic()
    time.sleep(down)
    failed = []
    if outage == "short":
        stack.pg.start()
    else:
        from mnist_opt.search.slots import fail_stale
        from mnist_opt.tracking.storage import make_storage

        # the grace period is each process's setting: the test's must be the workers'
        monkeypatch.setenv("MNIST_OPT_HEARTBEAT", str(heartbeat))
        monkeypatch.setenv("MNIST_OPT_GRACE", str(grace))
        for w in stack.workers:
            w.down()
        try:
            stack.pg.start()
            study = optuna.load_study(study_name=name, storage=make_storage(stack.pg.url("optuna")))
            fail_stale(study)  # what a worker's next poll does
            failed = [t for t in study.get_trials(states=(TS.FAIL,))]
        finally:
            for w in stack.workers:
                w.up()
        assert {t.number for t in failed} == {t.number for t in running}, failed
    outage_s = time.monotonic() - stopped
    _finish(procs)
    for w, proc in zip(WORKERS, procs):
        assert proc.returncode == 0, f"{w}:\n{tail(proc)}"
    trials = _check_end(stack, name, n_trials)
    if outage == "short":  # nothing was lost: no trial failed
        assert [t.number for t in trials if t.state != TS.COMPLETE] == [], trials
    for lost in failed:
        _requeued(trials, trials[lost.number])
    # every worker met the outage mid-trial: lost connection, back, and its trial lost
    lines = _fault_report(procs, r"database|failed as stale", at_least=2 * len(procs))
    assert all(any("unreachable" in line for line in found) for found in lines.values()), lines
    print(f"\npostgres {outage} outage ({outage_s:.0f} s, grace {grace} s): study of {n_trials} "
          f"trials in {time.monotonic() - start:.0f} s; reported: {lines}")


def _tracking_server_away(stack: Stack, name: str, n_trials: int, seconds: float, **extra: str):
    """A study whose MLflow server is killed (SIGKILL, its whole process group) while every
    worker trains, and started again ``seconds`` later; once every worker exited 0, the
    workers' processes, the checked trials (:func:`_check_end`) and how long it was away."""
    # grace: the default 30 s; a restart that starves a worker's heartbeat thread of the cores for
    # a few seconds must not look like a dead worker: this is about the tracking server
    procs = stack.start(name, n_trials, heartbeat=1, grace=30, **extra)
    _wait_until("3 trials training", lambda: len(_training(stack, name)) == 3, 600, procs)
    stack.server.stop(signal.SIGKILL)
    stopped = time.monotonic()
    time.sleep(seconds)
    stack.server.start()
    away_s = time.monotonic() - stopped
    _finish(procs)
    for w, proc in zip(WORKERS, procs):
        assert proc.returncode == 0, f"{w}:\n{tail(proc)}"
    return procs, _check_end(stack, name, n_trials), away_s


def test_workers_ride_out_a_tracking_server_restart(as_worker):
    """(b) The MLflow server is killed (SIGKILL, its whole process group) while every worker
    is mid-trial, and started again: MLflow's client retries each request
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``=7 with ``…_BACKOFF_FACTOR``=2: about 4 minutes), so
    no trial fails and every metric, run end and model reaches the server."""
    stack, name, n_trials = as_worker, "mlflowkill", 4
    start = time.monotonic()
    procs, trials, away_s = _tracking_server_away(stack, name, n_trials, 3)
    assert [(t.number, t.user_attrs.get("fail_reason")) for t in trials
            if t.state != TS.COMPLETE] == [], [t.user_attrs for t in trials]
    lines = _fault_report(procs, r"Retrying|tracking server")
    assert all(any("tracking server not answering" in line for line in found)
               for found in lines.values()), lines
    print(f"\nmlflow server away {away_s:.0f} s: study of {n_trials} trials in "
          f"{time.monotonic() - start:.0f} s; reported: {lines}")


def test_a_tracking_server_away_past_mlflow_s_retries_costs_only_the_trials_it_cut(as_worker):
    """(b), longer than MLflow's retries: the server is killed while every worker trains and
    comes back only after each worker's client gave up (its retries made short here, so that
    seconds stand for the ~4 minutes of the defaults). Each trial it cut fails as
    "tracking server unreachable" (not a failure of its parameters: the study does not stop
    for failures in a row) and is queued again; its worker waits for the server, closes the
    trial's run KILLED and goes on."""
    stack, name, n_trials = as_worker, "mlflowaway", 4
    short = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    start = time.monotonic()
    procs, trials, away_s = _tracking_server_away(stack, name, n_trials, 20, **short)
    cut = [t for t in trials if t.state == TS.FAIL]
    # one per worker, as many as search.max_consecutive_failures' default: counted as
    # failures, they would have stopped the study (and the workers' exit codes said so)
    assert len(cut) >= 3 and all(t.user_attrs["fail_reason"].startswith("tracking server unreachable")
                       for t in cut), [t.user_attrs for t in cut]
    client = MlflowClient(stack.server.uri)
    for t in cut:
        _requeued(trials, t)
        run_id = t.user_attrs.get("mlflow_run_id")  # none: cut as its run was being opened
        assert run_id is None or client.get_run(run_id).info.status == "KILLED", t.number
    lines = _fault_report(procs, r"tracking server")
    assert all(any("did not answer" in line for line in found) for found in lines.values()), lines
    print(f"\nmlflow server away {away_s:.0f} s, past the clients' retries: study of {n_trials} "
          f"trials in {time.monotonic() - start:.0f} s; reported: {lines}")


def test_a_worker_cut_off_past_the_grace_period_records_no_duplicate(as_worker):
    """(c) w1's link is cut (``ip link set … down`` on its end of the bridge) while it trains a
    trial, and restored only after another worker has failed that trial as stale and queued
    its parameters again. w1 trains on meanwhile (its storage and MLflow calls wait and
    retry); back on the network it finds its trial failed, drops what it measured (its run
    ends KILLED, nothing is recorded for the trial) and goes on with the study. The requeued
    parameters complete exactly once."""
    _cut_past_grace(as_worker, "linkcut")


@pytest.fixture(scope="module")
def loopback_stack():
    with LoopbackBench(readonly=[os.environ["MNIST_OPT_DATA"], ROOT, sys.prefix]) as bench:
        yield Stack(bench)


def test_the_loopback_bench_cuts_a_link_too(loopback_stack, monkeypatch):
    """The bench where namespaces cannot be had (hosts on loopback addresses, each reaching
    the others through relays of its own): the study, and (c) on it. Run here even where
    namespaces work, so that the fallback is known to work. Its cut holds w1's bytes rather
    than dropping them, so w1's calls wait out the cut instead of breaking after 25 s."""
    stack = _as_worker(loopback_stack, monkeypatch)
    assert {stack.seen[w.name] for w in stack.workers} & {stack.db.addr} == set()  # relays
    _cut_past_grace(stack, "loopcut")


def _cut_past_grace(stack: Stack, name: str) -> None:
    n_trials = 5
    heartbeat, grace = 1, 6
    start = time.monotonic()
    procs = stack.start(name, n_trials, heartbeat, grace)
    victim = _wait_until("trial training on w1", lambda: _training(stack, name, "w1"), 600,
                         procs)[0]
    w1 = stack.workers[0]
    w1.down()
    cut = time.monotonic()
    try:
        # the link stays down until the others have failed the trial (not for a fixed time:
        # how soon they look depends on when their own trials end) and a little longer
        _wait_until(f"trial {victim.number} failed as stale",
                    lambda: stack.study(name).trials[victim.number].state == TS.FAIL, 300, procs)
        time.sleep(2)
    finally:
        w1.up()
    cut_s = time.monotonic() - cut
    _finish(procs)
    for w, proc in zip(WORKERS, procs):
        assert proc.returncode == 0, f"{w}:\n{tail(proc)}"
    trials = _check_end(stack, name, n_trials)
    lost = trials[victim.number]
    assert lost.state == TS.FAIL and lost.user_attrs["fail_reason"].startswith(
        "stale: no heartbeat"), lost.user_attrs
    _requeued(trials, lost)  # one COMPLETE copy: w1 recorded no second one
    run = MlflowClient(stack.server.uri).get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED", run.info
    lines = _fault_report(procs, r"database|stale|tracking server")
    assert any(f"trial {victim.number} was failed as stale" in line
               for line in lines[procs[0].log.name]), lines
    print(f"\nlink cut {cut_s:.0f} s (grace {grace} s): study of {n_trials} trials in "
          f"{time.monotonic() - start:.0f} s; reported: {lines}")
