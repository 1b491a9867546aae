"""`make dashboard` and `make mlflow-ui` serve a study that just ran (HTTP APIs, 127.0.0.1 only)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from mnist_opt.study.config import find_study, with_overrides
from mnist_opt.search.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    """``n`` different free ports: all held open while they are picked, since two picked one
    after the other can be the same (then one server took the other's port: a 404 for 300 s)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _fetch(url: str, body: dict | None = None, deadline: float = 300.0) -> dict:
    """Poll until the server answers (they take a few seconds to start)."""
    end, last = time.monotonic() + deadline, None
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError as exc:
            last = exc
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {deadline}s: {last}")


def _serve(target: str, **variables: str) -> subprocess.Popen:
    args = ["make", "-s", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def served_study(stores: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A 2-trial ``mlp_tpe`` study in ``stores``, then ``make dashboard`` and ``make mlflow-ui``
    on free ports; yields their base URLs and stops both servers afterwards."""
    cfg = with_overrides(find_study("mlp_tpe"), n_trials=2, max_epochs=1, train_subset=1000)
    run_study(cfg, stores["storage"], verbose=False, progress=False)
    dash_port, ui_port = _free_ports(2)
    dash = _serve("dashboard", STORAGE=stores["storage"], DASHBOARD_PORT=str(dash_port))
    ui = _serve("mlflow-ui", TRACKING=stores["tracking"], MLFLOW_PORT=str(ui_port))
    try:
        yield f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{ui_port}"
    finally:
        _stop(dash)
        _stop(ui)


def test_dashboard_and_mlflow_ui_serve_the_study(stores):
    with served_study(stores) as (dash, ui):
        studies = _fetch(f"{dash}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["mlp_tpe"]
        detail = _fetch(f"{dash}/api/studies/{studies[0]['study_id']}")
        assert len(detail["trials"]) == 2
        exps = _fetch(f"{ui}/api/2.0/mlflow/experiments/search",
                      {"max_results": 10})["experiments"]
        exp = next(e for e in exps if e["name"] == "mlp_tpe")
        runs = _fetch(f"{ui}/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        assert sorted(t["mnist_opt.kind"] for t in tags) == ["study", "trial", "trial"]
