"""Faults: NaN losses, exceptions inside trials, Ctrl-C, kill -9 and restart — real processes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.study.config import load_config
from mnist_opt.search.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TS = optuna.trial.TrialState


def _study_file(tmp_path: Path, name: str, **changes) -> Path:
    """A small MLP study (no pruner, 1,000 images) with ``changes`` merged into its sections."""
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000},
           "search": {"sampler": "random", "pruner": "none", "n_trials": 4, "seed": 3},
           "training": {"max_epochs": 2},
           "space": {"n_layers": 1, "units": {"low": 16, "high": 64},
                     "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}}
    for section, values in changes.items():
        doc[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_nan_loss_stops_the_trial_and_records_why(stores, tmp_path):
    path = _study_file(tmp_path, "diverge", search={"n_trials": 2},
                       space={"optimizer": "sgd", "learning_rate": 10.0,
                              "activation": "exponential"})  # overflows at once
    study = run_study(load_config(path), stores["storage"], verbose=False, progress=False)
    client = MlflowClient()
    for trial in study.trials:
        assert trial.state == TS.PRUNED
        assert len(trial.intermediate_values) == 0  # stopped in the first epoch, never reported
        assert "non-finite loss at epoch 1" in trial.user_attrs["prune_reason"]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert "non-finite" in run.data.tags["prune_reason"] and run.info.status == "KILLED"


def test_an_exception_in_a_trial_is_recorded_and_the_study_goes_on(stores, tmp_path, poisoned):
    path = _study_file(tmp_path, "flaky", search={"n_trials": 6, "max_consecutive_failures": 6},
                       space={"activation": {"choices": ["relu", poisoned]}})
    study = run_study(load_config(path), stores["storage"], verbose=False, progress=False)
    bad = [t for t in study.trials if t.params["activation"] == poisoned]
    good = [t for t in study.trials if t.params["activation"] == "relu"]
    assert bad and good and len(study.trials) == 6
    client = MlflowClient()
    for trial in bad:
        assert trial.state == TS.FAIL
        assert "injected failure" in trial.user_attrs["fail_reason"]
        assert "Traceback" in trial.user_attrs["traceback"]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"
        assert "injected failure" in run.data.tags["fail_reason"]
    assert all(t.state == TS.COMPLETE for t in good)


def _start(path: Path, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "MNIST_OPT_HEARTBEAT": "2", "MNIST_OPT_GRACE": "4", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mnist_opt", "study", str(path), "-q", "-w", "1",
                             *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"study exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        try:
            if predicate():
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _mid_trial(storage: str, name: str) -> bool:
    """One trial finished and the next one has reported an epoch (so it is well under way)."""
    trials = _trials(storage, name)
    running = [t for t in trials if t.state == TS.RUNNING]
    return (any(t.state == TS.COMPLETE for t in trials) and bool(running)
            and bool(running[0].user_attrs.get("mlflow_run_id")))


def test_ctrl_c_marks_the_trial_closes_the_runs_and_prints_the_summary(stores, tmp_path):
    path = _study_file(tmp_path, "interrupt", training={"max_epochs": 30})
    proc = _start(path, tmp_path)
    _wait_for(lambda: _mid_trial(stores["storage"], "interrupt"), "a trial under way", proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted; study interrupt: 1 complete" in out
    trials = _trials(stores["storage"], "interrupt")
    assert [t.state for t in trials] == [TS.COMPLETE, TS.FAIL]
    assert "interrupted" in trials[1].user_attrs["fail_reason"]
    client = MlflowClient()
    exp = client.get_experiment_by_name("interrupt")
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    killed = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED"
    parent = [r for r in runs if r.data.tags["mnist_opt.kind"] == "study"]
    assert [p.info.status for p in parent] == ["KILLED"]


def test_kill_9_then_rerun_keeps_every_finished_trial_and_reaches_the_target(stores, tmp_path):
    path = _study_file(tmp_path, "killed", search={"n_trials": 3}, training={"max_epochs": 30})
    proc = _start(path, tmp_path)
    _wait_for(lambda: _mid_trial(stores["storage"], "killed"), "a trial under way", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = _trials(stores["storage"], "killed")
    killed = next(t for t in before if t.state == TS.RUNNING)
    client = MlflowClient()
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    time.sleep(5)  # past the grace period: the dead worker's heartbeat is stale
    # fewer epochs make the rerun quick; a shorter budget per trial is another version of
    # the study, so the rerun says it mixes them knowingly
    rerun = _start(path, tmp_path, "--max-epochs", "2", "--mix-versions")
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    after = _trials(stores["storage"], "killed")
    finished = [t for t in after if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 3
    for old in before:  # everything finished before the kill is kept as it was
        if old.state == TS.COMPLETE:
            assert after[old.number].state == TS.COMPLETE and after[old.number].value == old.value
    assert after[killed.number].state == TS.FAIL
    retried = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].state == TS.COMPLETE
    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    trial_runs = [r for r in runs if r.data.tags["mnist_opt.kind"] == "trial"]
    assert sorted(int(r.data.tags["trial_number"]) for r in trial_runs) == [t.number for t in after]
    parents = sorted(r.info.status for r in runs if r.data.tags["mnist_opt.kind"] == "study")
    assert parents == ["FINISHED", "KILLED"]
    # once the target is reached, running again does nothing and says so
    again = _start(path, tmp_path)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "nothing to run" in out
    assert len(_trials(stores["storage"], "killed")) == len(after)


def test_a_lone_worker_whose_tracking_server_goes_away_loses_only_the_trial_it_cut(stores,
                                                                                 tmp_path):
    """The tracking server stops mid-trial and comes back 8 s later, past the client's
    retries (made short): the trial it cut fails as "tracking server unreachable", its run
    ends KILLED, its parameters run again, and the one worker still finishes all of the
    study's trials (the cut one is not one of them), in three lines and no traceback."""
    from conftest import free_port, running_mlflow_server

    path = _study_file(tmp_path, "away", search={"n_trials": 3}, training={"max_epochs": 30})
    root, port = tmp_path / "server", free_port()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    with running_mlflow_server(backend, root, port=port) as server:
        proc = _start(path, tmp_path, env={
            "MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
        _wait_for(lambda: _mid_trial(stores["storage"], "away"), "a trial under way", proc)
    time.sleep(8)  # stopped: refused, past the retries
    with running_mlflow_server(backend, root, port=port) as server:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        trials = _trials(stores["storage"], "away")
        client = MlflowClient(server["uri"])
        cut = [t for t in trials if t.state == TS.FAIL]
        assert len(cut) == 1 and cut[0].user_attrs["fail_reason"].startswith(
            "tracking server unreachable"), [(t.number, t.state, t.user_attrs) for t in trials]
        assert client.get_run(cut[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"
        again = [t for t in trials if t.system_attrs.get("failed_trial") == cut[0].number]
        assert [t.state for t in again] == [TS.COMPLETE] and again[0].params == cut[0].params
        assert sum(t.state == TS.COMPLETE for t in trials) == 3
        runs = client.search_runs([client.get_experiment_by_name("away").experiment_id])
        assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    said = [line for line in out.splitlines() if "tracking server" in line]
    assert "Traceback" not in out and len(said) <= 3, said
    assert any("did not answer" in line for line in said), said


def test_only_a_tracking_server_that_does_not_answer_counts_as_unreachable(monkeypatch, tmp_path):
    """What makes a trial fail as "tracking server unreachable" (and run again) rather than
    as a failure of its own: MLflow's client gave up reaching the server, not a refusal."""
    import socket

    from mlflow.exceptions import MlflowException

    from mnist_opt.tracking.runs import unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MlflowException) as refused:
        MlflowClient(f"http://127.0.0.1:{port}").get_run("0" * 32)
    assert unreachable(refused.value), refused.value
    with _answering(503) as url:  # answers, but only "unavailable", past the retries
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        with pytest.raises(MlflowException) as unavailable:
            MlflowClient(url).get_run("0" * 32)
    assert unreachable(unavailable.value), unavailable.value
    with pytest.raises(MlflowException) as missing:  # a store that answers: no such run
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run("0" * 32)
    assert not unreachable(missing.value), missing.value


@contextlib.contextmanager
def _answering(status: int):
    """An HTTP server on 127.0.0.1 that answers every request with ``status``; its URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
