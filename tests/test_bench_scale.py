"""``bench/scale.py`` (``make bench-scale``) at its smallest: N = 1 and 2 simulated workers,
2 trials each, plain RDB storage and the gRPC proxy, in the namespaced bench. Checks the
output's structure and that the counts add up, not the timings.

Needs root (``ip netns``); skipped only where ``unshare -n true`` fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hosts import leftovers, namespaces_work

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scale import counts_add_up  # noqa: E402 - bench/ is no package

ROOT = Path(__file__).resolve().parent.parent
TRIALS = 2
PACE = 1.0  # seconds a paced trial sleeps in all
NS = (1, 2)
STORAGES = ("rdb", "grpc")

namespaces = pytest.mark.skipif(not namespaces_work(),
                                reason="`unshare -n true` fails: no network namespaces here")


@namespaces
@pytest.mark.slow
@pytest.mark.postgres
def test_the_scale_bench_runs_and_its_counts_add_up(tmp_path):
    start = time.monotonic()
    readme = (ROOT / "README.md").read_text()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--ns", ",".join(map(str, NS)),
         "--trials-per-worker", str(TRIALS), "--storages", ",".join(STORAGES), "--hosts", "2",
         "--mlflow-workers", "1", "--warm-up", "0", "--out", str(tmp_path), "--timeout", "300",
         "--paced-n", "2", "--paced-trials", str(TRIALS), "--paced-seconds", str(PACE)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()  # it tears its bench down on SIGTERM
            proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-5000:]
    assert leftovers(proc.pid) == []  # namespaces, links and folders gone
    assert (ROOT / "README.md").read_text() == readme  # only the full run writes the README

    out = json.loads((tmp_path / "scale.json").read_text())
    for key in ("started", "finished", "machine", "code", "versions", "postgresql",
                "trial_time", "command"):
        assert out[key], key
    assert out["trial_time"]["seconds"] > 0
    assert [(r["n"], r["storage"]) for r in out["results"]] == [
        (n, s) for n in NS for s in STORAGES]
    assert [(r["n"], r["storage"], r["pace_s"]) for r in out["paced"]] == [
        (2, s, PACE) for s in STORAGES]
    for r in out["paced"]:  # each worker's trials slept their pace, and nothing was lost
        assert counts_add_up(r), r["error_samples"]
        # every trial slept 0.5-1.5 x PACE in all, as the worker reports
        assert r["pace_s"] == PACE and r["slept_s"] >= r["n"] * TRIALS * PACE / 2
        assert r["wall_s"] >= TRIALS * PACE / 2
        assert r["coordination_per_trial_s"]["p50"] > 0
    for r in out["results"]:
        where = f"{r['storage']} N={r['n']}: {r['error_samples']}"
        target = r["n"] * TRIALS
        assert r["target"] == target, where
        assert r["asked"] == r["told"] == target, where
        assert r["study_states"] == {"COMPLETE": target}, where
        assert r["mlflow_runs"] == r["mlflow_runs_finished"] == target, where
        assert r["errors"] == 0 and r["error_samples"] == [], where
        assert r["trials_per_s"] > 0 and r["wall_s"] > 0, where
        # each worker's first trial is left out of the percentiles
        measured = target - r["n"]
        lat = r["latency_s"]
        once = ("gate", "ask", "suggest", "set_user_attr", "tell", "mlflow.create_run",
                "mlflow.log_params", "mlflow.log_artifact", "mlflow.end_run")
        for call in once:
            assert lat[call]["n"] == measured, (call, where)
            assert 0 < lat[call]["p50"] <= lat[call]["p95"], (call, where)
        for call in ("report", "mlflow.log_metric"):
            assert lat[call]["n"] == measured * out["steps"], (call, where)
        cost = r["coordination_per_trial_s"]
        assert 0 < cost["p50"] <= cost["p95"], where
        # a trial is nothing but its calls: its cost is at least any of them
        assert cost["p50"] >= max(lat[call]["p50"] for call in once), where
        assert r["pace_s"] == 0 and r["slept_s"] == 0, where  # the closed loop: no sleep
        peak = r["peak_db_connections"]
        assert 0 < peak["mlflow"] and peak["total"] <= 100, where
        if r["storage"] == "rdb":  # the storage's pool; behind the proxy only the gate's lock
            assert peak["workers"] > 0 and peak["proxy"] == 0, where  # (a moment per claim)
        else:
            assert peak["proxy"] > 0, where

    md = (tmp_path / "scale.md").read_text()
    assert "| storage | N | trials | trials / s |" in md and "lower bound" in md
    # the closed-loop rows twice (figures, calls), the paced row once
    assert md.count("| RDB |") == 2 * len(NS) + 1 and md.count("| gRPC proxy |") == 2 * len(NS) + 1
    assert "Paced" in md
    print(f"\nscale bench, N = {NS}, {STORAGES}: {time.monotonic() - start:.0f} s")
