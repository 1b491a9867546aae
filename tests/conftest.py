"""Shared fixtures: real data from $MNIST_OPT_DATA, and throw-away Optuna/MLflow stores."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests read the real datasets; CI points MNIST_OPT_DATA at ../shared/data.
os.environ.setdefault("MNIST_OPT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
