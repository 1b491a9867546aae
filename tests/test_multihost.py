"""Several machines on one (tests/hosts.py: network namespaces on a private bridge, or where
those cannot be made, loopback addresses with relays between them): a
database host runs PostgreSQL and ``mlflow server``, set up with the README's many-machine
recipe (``deploy/``: a password that clients find in ``.pgpass``, MLflow's basic
authentication); three worker hosts run one study together, each knowing only the variables of
``deploy/worker.env`` and its ``.pgpass``; a fourth host retrains the best trial after the
workers' folders are gone, a fifth serves the registered model, a sixth asks it for
predictions. No host sees another's files (on the namespaced bench; the loopback one cannot
hide them).

Needs root (``ip netns``, or PostgreSQL's own user on the loopback bench); skipped only where
neither can be had. ``MNIST_OPT_BENCH=loopback`` runs it on the loopback bench.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from hosts import BASE_PATH, Bench, MlflowServer, Postgres, bench_kind, leftovers, make_bench
from hosts import namespaces_work
from hosts import recipe_env, tail
from hosts import clean_leftovers, stop_group, wait_http

ROOT = Path(__file__).resolve().parent.parent
TS = optuna.trial.TrialState
NAME = "multihost"
N_TRIALS = 6
WORKERS = ("w1", "w2", "w3")
MLFLOW_PASSWORD = "bench-workers-password"  # MLflow wants 12 characters at least

# the one reason to skip: where namespaces can be made, a failure to build the bench fails
namespaces = pytest.mark.skipif(not namespaces_work(),
                                reason="`unshare -n true` fails: no network namespaces here")
a_bench = pytest.mark.skipif(bench_kind() is None, reason="not root: `unshare -n true` fails and "
                             "PostgreSQL cannot run as its own user")


def _study_doc() -> str:
    """One tiny dense layer on 600 images, one epoch per trial, random sampler, no pruner."""
    return yaml.safe_dump({
        "dataset": "mnist", "model": "mlp",
        "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 600},
        "search": {"sampler": "random", "pruner": "none", "n_trials": N_TRIALS, "seed": 3},
        "training": {"max_epochs": 1},
        "space": {"n_layers": 1, "units": {"low": 16, "high": 32}}})


def _mnist_opt_env(**stores: str) -> dict[str, str]:
    """What a machine with this package installed needs: the interpreter on PATH, the code,
    the data; plus the stores it is told (nothing else of the test process's)."""
    return {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "PYTHONPATH": str(ROOT),
            "MNIST_OPT_DATA": os.environ["MNIST_OPT_DATA"], "TF_CPP_MIN_LOG_LEVEL": "2", **stores}



def _status(credentials: str | None, url: str) -> int:
    """The HTTP status the tracking server answers to a GET of ``url`` with these basic-auth
    ``credentials`` ("user:password") or none."""
    headers = {} if credentials is None else {
        "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _own_processes(tag: str) -> list[str]:
    """Processes whose command line names this bench (its folders carry ``tag``)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if tag in line:
            found.append(f"{proc.info['pid']}: {line[:200]}")
    return found


def _with_uvloop(root: int) -> list[str]:
    """The processes from ``root`` down that have uvloop's event loop loaded."""
    tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    return [" ".join(p.cmdline()) for p in tree
            if "uvloop/loop." in Path(f"/proc/{p.pid}/maps").read_text()]


def _check_tracking(client: MlflowClient, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Every COMPLETE trial has exactly one trial run with its model, all behind the server's
    artifact proxy; no run is left RUNNING."""
    exp = client.get_experiment_by_name(NAME)
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:/"), exp
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    bad = [(r.info.run_name, r.info.artifact_uri) for r in runs
           if not r.info.artifact_uri.startswith("mlflow-artifacts:/")]
    assert bad == []
    trial_runs = [r for r in runs if r.data.tags.get("mnist_opt.kind") == "trial"]
    models = client.search_logged_models(experiment_ids=[exp.experiment_id], max_results=1000)
    assert [m.artifact_location for m in models
            if not m.artifact_location.startswith("mlflow-artifacts:/")] == []
    for trial in (t for t in trials if t.state == TS.COMPLETE):
        mine = [r for r in trial_runs if r.data.tags["trial_number"] == str(trial.number)]
        assert [r.info.run_id for r in mine] == [trial.user_attrs["mlflow_run_id"]], trial.number
        assert mine[0].info.status == "FINISHED"
        assert len([m for m in models if m.source_run_id == mine[0].info.run_id]) == 1, trial.number


@a_bench
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.postgres
def test_workers_on_three_hosts_share_a_study_through_the_servers(monkeypatch):
    start = time.monotonic()
    bench = make_bench(readonly=[os.environ["MNIST_OPT_DATA"], ROOT, sys.prefix])
    tag = bench.tag
    with bench:
        db = bench.host("db")
        pg = Postgres(db).start()
        server = MlflowServer(db, pg).start()
        recipe = recipe_env(db.addr, MLFLOW_PASSWORD)
        assert recipe["MLFLOW_TRACKING_URI"] == server.uri, "the bench's server is not the recipe's"
        user = recipe["MLFLOW_TRACKING_USERNAME"]
        server.add_user(user, MLFLOW_PASSWORD)
        # who may use the tracking server: nobody without the password
        search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(None, search) == 401
        assert _status(f"{user}:not-the-password", search) == 401
        assert _status(f"{user}:{MLFLOW_PASSWORD}", search) == 200
        # the server answers from uvicorn on uvloop, asked for by name (deploy/mlflow-server.sh:
        # without it, several server processes leave Nagle on and each request waits ~40 ms)
        assert [line for line in _with_uvloop(server.proc.pid)
                if "uvicorn" in line and "--loop uvloop" in line], _own_processes(tag)
        # the test process reads both stores as a worker does: password file, credentials
        monkeypatch.setenv("PGPASSFILE", str(pg.pgpass(bench.base / "test.pgpass")))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
        workers = [bench.host(name) for name in WORKERS]
        connect = [sys.executable, "-c", "import os, psycopg; "
                   "psycopg.connect(os.environ['OPTUNA_STORAGE']).close()"]
        seen = {w.name: w.reach(db, pg.port, server.port) for w in workers}  # db's address
        envs = {w.name: _mnist_opt_env(**recipe_env(seen[w.name], MLFLOW_PASSWORD))
                for w in workers}
        refused = workers[0].run(connect, env=envs["w1"], check=False)  # before its .pgpass
        assert refused.returncode != 0 and "no password supplied" in refused.stdout, refused.stdout
        for w in workers:  # a machine of its own: its folder only, not the server's or a peer's
            assert w.sees(w.home)
            if bench.isolates_files:
                assert not w.sees(db.home) and not w.sees(server.artifacts)
                assert not any(w.sees(peer.home) for peer in workers if peer is not w)
            (w.home / f"{NAME}.yaml").write_text(_study_doc())
            pg.pgpass(w.home / ".pgpass", seen[w.name])  # ~/.pgpass: HOME is the host's folder
        procs = [w.popen([sys.executable, "-m", "mnist_opt", "study", f"{NAME}.yaml",
                          "--workers", "1", "-q"], env=envs[w.name], log="study")
                 for w in workers]
        try:
            for proc in procs:
                proc.wait(timeout=900)
        finally:
            for proc in procs:
                stop_group(proc, grace=5)
        for w, proc in zip(workers, procs):
            assert proc.returncode == 0, f"{w.name}:\n{tail(proc)}"
        study_s = time.monotonic() - start

        trials = optuna.load_study(study_name=NAME, storage=pg.url("optuna")).trials
        client = MlflowClient(server.uri)
        assert all(t.state == TS.COMPLETE for t in trials), [(t.number, t.state) for t in trials]
        assert {t.user_attrs["host"] for t in trials} <= {w.hostname for w in workers}
        _check_tracking(client, trials)
        stored = list(server.artifacts.rglob("MLmodel"))
        assert len(stored) == len(trials), stored  # on the server host's disk, nowhere else

        for w in workers:  # nothing a worker wrote is needed from here on
            shutil.rmtree(w.home)
        trainer = bench.host("trainer")
        (trainer.home / f"{NAME}.yaml").write_text(_study_doc())
        seen = trainer.reach(db, pg.port, server.port)
        pg.pgpass(trainer.home / ".pgpass", seen)
        out = trainer.run([sys.executable, "-m", "mnist_opt", "retrain", f"{NAME}.yaml", "-q"],
                          env=_mnist_opt_env(**recipe_env(seen, MLFLOW_PASSWORD)),
                          timeout=900).stdout
        assert f"registered model {NAME} version 1" in out, out[-3000:]
        stored = client.get_model_version_download_uri(NAME, "1")
        assert stored.startswith("mlflow-artifacts:/"), stored
        _check_tracking(client, trials)  # the retrain run's URIs too; no run left RUNNING
        retrain_s = time.monotonic() - start - study_s

        serving, asker = bench.host("serving"), bench.host("asker")
        assert not bench.isolates_files or not (serving.sees(server.artifacts)
                                                or serving.sees(trainer.home))

        def serve_env(host):  # the tracking server's variables only, as host reaches it
            return _mnist_opt_env(**{k: v for k, v in recipe_env(
                host.reach(db, server.port), MLFLOW_PASSWORD).items() if k.startswith("MLFLOW_")})
        scorer = serving.popen([sys.executable, "-m", "mnist_opt", "serve", NAME,
                                "--host", serving.addr, "--port", "5001"], env=serve_env(serving),
                               log="serve")
        asker.run(["sh", "-c", f"{sys.executable} -m mnist_opt serve {NAME} --example 2 "
                               "> body.json"], env=serve_env(asker), timeout=300)
        wait_http(f"http://{serving.addr}:5001/ping", 300, scorer)
        post = ("import json, sys, urllib.request\n"
                "req = urllib.request.Request(sys.argv[1], data=open('body.json', 'rb').read(),"
                " headers={'Content-Type': 'application/json'})\n"
                "print(urllib.request.urlopen(req, timeout=120).read().decode())\n")
        reply = asker.run([sys.executable, "-c", post,
                           f"http://{asker.reach(serving, 5001)}:5001/invocations"],
                          env=serve_env(asker), timeout=180).stdout
        predictions = json.loads(reply.strip().splitlines()[-1])["predictions"]
        assert [len(row) for row in predictions] == [10, 10], reply[-2000:]
        assert all(abs(sum(row) - 1) < 1e-3 for row in predictions)
        start_line = f"serving models:/{NAME}@champion (version 1"
        assert start_line in Path(scorer.log).read_text(), tail(scorer)

        finished = [t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED)]
        t0 = min(t.datetime_start for t in trials)
        timeline = [(t.number, t.user_attrs["host"].split(".")[0],
                     round((t.datetime_start - t0).total_seconds(), 1),
                     round((t.datetime_complete - t0).total_seconds(), 1)) for t in trials]
        print(f"\nmultihost: study {study_s:.0f} s, retrain {retrain_s:.0f} s, serve "
              f"{time.monotonic() - start - study_s - retrain_s:.0f} s; trials (number, host, "
              f"start s, end s): {timeline}")
        # last, so that the rest is known to hold when it fails. Each host's invocation would
        # run the whole target alone; the study's lock (search/slots.py) shares it out exactly
        assert len(finished) == N_TRIALS, (
            f"{len(finished)} finished trials, target {N_TRIALS}; (number, host, start s, end s): "
            f"{timeline}")
    assert leftovers() == [] and _own_processes(tag) == []


@namespaces
def test_the_bench_leaves_nothing_behind_even_when_it_fails():
    """A bench that fails half-way is torn down whole, daemons included; one whose process
    died is removed by the next bench."""
    bench = Bench()
    with pytest.raises(RuntimeError, match="on purpose"):
        with bench:
            a, b = bench.host("a"), bench.host("b")
            a.popen(["sleep", "600"])
            # a daemon: its own session, out of the process group the bench stops
            b.popen(["sh", "-c", "setsid sleep 600 & echo $! > daemon.pid; exec sleep 600"])
            assert b.run(["hostname"]).stdout.strip() == "b.bench"
            assert not a.sees(b.home) and a.sees(a.home)
            pidfile, end = b.home / "daemon.pid", time.monotonic() + 30
            while not (pidfile.exists() and pidfile.read_text().strip()):
                assert time.monotonic() < end, "the daemon did not start"
                time.sleep(0.1)
            daemon = int(pidfile.read_text())
            assert psutil.pid_exists(daemon)
            raise RuntimeError("on purpose")
    assert leftovers() == [] and _own_processes(bench.tag) == []
    assert not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
    # a crashed run's leftovers: named after a pid that no longer runs
    gone = subprocess.Popen(["true"])
    gone.wait()
    ns, link = f"mo-{gone.pid}-x", f"mo-{gone.pid}-br"
    folder = Path(tempfile.gettempdir()) / f"mo-{gone.pid}-left"  # where the bench looks
    folder.mkdir()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    assert {ns, link, str(folder)} <= set(clean_leftovers())
    assert leftovers(gone.pid) == []


def test_a_worker_that_loses_the_race_to_create_the_tables_opens_the_storage_again(monkeypatch,
                                                                                   tmp_path):
    """Workers on several hosts opening a fresh PostgreSQL storage at once: all but one find
    the tables being made (the bench's workers met it, 1 run in 3)."""
    from mnist_opt.tracking import storage

    calls, real = [], storage._Storage

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError('(psycopg.errors.DuplicateTable) relation "studies" already exists')
        return real(url, **kwargs)

    monkeypatch.chdir(tmp_path)  # the SQLite init lock file goes beside ":memory:"
    monkeypatch.setattr(storage, "_Storage", racing)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    url = "sqlite:///:memory:"
    assert storage.make_storage(url) is not None and calls == [url, url]

    def always(url, **kwargs):
        calls.append(url)
        raise RuntimeError('relation "studies" already exists')

    calls.clear()
    monkeypatch.setattr(storage, "_Storage", always)
    with pytest.raises(storage.StorageError, match="already exists"):  # not forever
        storage.make_storage(url)
    assert len(calls) == storage._OPEN_ATTEMPTS
