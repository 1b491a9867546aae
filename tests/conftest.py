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
