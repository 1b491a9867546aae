"""Shared fixtures: real data from $MNIST_OPT_DATA, throw-away Optuna/MLflow stores, a
throw-away PostgreSQL server and MLflow tracking server (127.0.0.1 only), and what a seeded
random sampler proposes (to show that a model-based sampler, not its random start-up, ran).

Markers (setup.cfg): ``slow`` trains for more than a few seconds or runs whole studies,
``postgres`` starts PostgreSQL, ``browser`` drives chromium; ``make test-fast`` runs the rest.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import optuna
import pytest
from hosts import stop_group

ROOT = Path(__file__).resolve().parent.parent

# Tests read the real datasets; CI points MNIST_OPT_DATA at ../shared/data.
os.environ.setdefault("MNIST_OPT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A cache of our own: a developer's `mnist-opt calibrate` must not switch the tests' studies
# (training.backend: auto) to another backend; the tests that need one plant it.
os.environ["MNIST_OPT_CACHE"] = tempfile.mkdtemp(prefix="mnist_opt_test_cache_")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start the servers below carry their marks, however they got the fixture."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "postgres" in names:
            item.add_marker(pytest.mark.postgres)
        if "mlflow_server" in names:  # starting it takes several seconds
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session: pytest.Session) -> None:
    mnist = Path(os.environ["MNIST_OPT_DATA"]) / "mnist"
    if not mnist.is_dir():
        raise pytest.UsageError(f"test data not found at {mnist}: set MNIST_OPT_DATA to the "
                                "directory holding mnist/ and fashion-mnist/")


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh SQLite Optuna storage and MLflow tracking store in tmp_path (cwd too)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_OPT_STUDIES", str(ROOT / "studies"))
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)  # this process's clients too, not only subprocesses
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", storage)
    return {"storage": storage, "tracking": tracking, "dir": str(tmp_path)}


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise pytest.UsageError("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): "
                                "run `make pg` (Debian's postgresql package) first")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres() -> dict[str, str]:
    """A throw-away PostgreSQL server on 127.0.0.1 with databases `optuna` and `mlflow`."""
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="mnist_opt_pg_"))
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_pg, str(bindir / tool), *args], check=True, capture_output=True)

    data = root / "data"
    pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
    pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "start",
       "-o", f"-h 127.0.0.1 -p {port} -k {root} -F")
    try:
        for db in ("optuna", "mlflow"):
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)
        base = f"postgresql://postgres@127.0.0.1:{port}"
        yield {"optuna": f"{base}/optuna", "mlflow": f"{base}/mlflow"}
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# A trial that fails at run time. The parameter table refuses every value the builders would
# reject, so a valid study file cannot make a trial fail on purpose: these fixtures make our
# own builder raise for one valid activation (POISON) — in this process, or in the `mnist-opt`
# subprocesses (and their workers) through a sitecustomize module on PYTHONPATH.
POISON = "elu"
_SITECUSTOMIZE = f'''
from mnist_opt.quiet import import_tensorflow

import_tensorflow()
import mnist_opt.training.loop as loop

_build = loop.build_model


def build_model(params):
    if params.get("activation") == {POISON!r}:
        raise RuntimeError("injected failure: activation {POISON}")
    return _build(params)


loop.build_model = build_model
'''


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> str:
    """Trials with activation POISON raise inside this process; returns the activation."""
    import mnist_opt.training.loop as loop

    build = loop.build_model

    def build_model(params):
        if params.get("activation") == POISON:
            raise RuntimeError(f"injected failure: activation {POISON}")
        return build(params)

    monkeypatch.setattr(loop, "build_model", build_model)
    return POISON


@pytest.fixture
def poisoned_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocesses whose trials with activation POISON raise."""
    folder = tmp_path_factory.mktemp("poison")
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(backend: str, root: Path, timeout: float = 180.0,
                          port: int | None = None) -> Iterator[dict[str, str]]:
    """``mlflow server`` on 127.0.0.1 (``port``, default a free one) with ``backend`` as its
    store and artifacts proxied to ``root/artifacts``; yields ``{"uri", "backend",
    "artifacts", "log"}``, stops it afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), root / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend,
           "--artifacts-destination", str(root / "artifacts")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "wb") as out:  # the server starts uvicorn and a job runner: one process group
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"mlflow server on {uri} did not start "
                                   f"(exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"uri": uri, "backend": backend, "artifacts": str(root / "artifacts"),
               "log": str(log)}
    finally:
        stop_group(proc, grace=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One MLflow tracking server for the session, as users on several machines would share
    one: SQLite behind it, artifacts proxied by it. Point a test at it with
    ``MLFLOW_TRACKING_URI=mlflow_server["uri"]`` (its env, or ``monkeypatch.setenv``).
    Tests share it: give each its own experiment (study) name."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root) as server:
        yield server


@pytest.fixture
def random_proposals() -> Callable[..., list[dict]]:
    """``random_proposals(cfg, n)``: the params of the first ``n`` trials that
    ``RandomSampler(seed=cfg.search.seed)`` proposes for the study's space.

    Optuna's TPE, GP and NSGA-II samplers draw their start-up trials from exactly this
    random sampler, so a trial past the start-up whose params equal these was not proposed
    by the model-based sampler."""
    from mnist_opt.study.space import suggest_params

    def propose(cfg, n: int) -> list[dict]:
        study = optuna.create_study(directions=cfg.directions,
                                    sampler=optuna.samplers.RandomSampler(seed=cfg.search.seed))
        out = []
        for _ in range(n):
            trial = study.ask()
            suggest_params(trial, cfg)
            study.tell(trial, [0.0] * len(cfg.directions))
            out.append(trial.params)
        return out

    return propose
