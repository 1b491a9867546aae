"""Parallel workers share one study: on PostgreSQL with an MLflow tracking server (two workers,
as on several machines) and on the default SQLite files (two shells on one machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TS = optuna.trial.TrialState


def _study_file(tmp_path: Path, name: str, n_trials: int, **search) -> Path:
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000},
           "search": {"sampler": "tpe", "n_startup_trials": 2, "pruner": "hyperband",
                      "n_trials": n_trials, "seed": 5, **search},
           "training": {"max_epochs": 3},
           "space": {"n_layers": {"low": 1, "high": 2}, "units": {"low": 16, "high": 64},
                     "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _study(path: Path, cwd: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnist_opt", "study", str(path), *extra],
                            cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check_consistent(storage: str, name: str, tracking: str) -> list[optuna.trial.FrozenTrial]:
    """Unique trial numbers, and exactly one MLflow trial run per Optuna trial, none RUNNING."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'trial'")
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == numbers
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status != "RUNNING" for r in runs)
    return trials


@pytest.mark.postgres
def test_two_workers_share_a_study_on_postgresql(postgres, mlflow_server, tmp_path):
    """Optuna on a PostgreSQL server, MLflow through a tracking server: what users whose
    workers run on several machines point them at (not MLflow's database itself)."""
    path = _study_file(tmp_path, "pg_parallel", n_trials=8, trials_per_worker=3)
    tracking = mlflow_server["uri"]
    env = {"OPTUNA_STORAGE": postgres["optuna"], "MLFLOW_TRACKING_URI": tracking}
    proc = _study(path, tmp_path, env, "--workers", "2")  # with the progress bar
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "2 workers started" in out and "replaced after 3 trials" in out
    # one bar across both workers' trials, read from the storage; no per-trial log lines
    final = out.replace("\r", "\n").split("pg_parallel: 100%")[-1].splitlines()[0]
    assert "8/8" in final and "best=0." in final and "running=0" in final
    assert "finished with value" not in out and "Trial 3 pruned" not in out
    trials = _check_consistent(postgres["optuna"], "pg_parallel", tracking)
    assert len(trials) == 8
    # each process claims at most 3 trials before a fresh one replaces it: 8 trials take
    # 3 processes (3 + 3 + 2) or 4 (3 + 3 + 1 + 1), however the two slots share them
    per_pid = [sum(t.user_attrs["pid"] == pid for t in trials)
               for pid in {t.user_attrs["pid"] for t in trials}]
    assert max(per_pid) <= 3 and len(per_pid) in (3, 4)
    assert all(t.user_attrs["rss_mb"] > 100 for t in trials)  # TensorFlow alone is more
    assert all(t.state in (TS.COMPLETE, TS.PRUNED) for t in trials)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("pg_parallel")
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_runs = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'trial'")
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    # the runs went through the server: its store holds them, its artifact proxy the models
    assert MlflowClient(mlflow_server["backend"]).get_experiment_by_name("pg_parallel")
    complete = [t for t in trials if t.state == TS.COMPLETE]
    assert complete
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert {m.source_run_id for m in models} >= {t.user_attrs["mlflow_run_id"] for t in complete}
    stored = [p for p in Path(mlflow_server["artifacts"]).rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in stored), stored[:20]


def test_two_shells_on_a_fresh_sqlite_file(tmp_path):
    """Two independent commands start at once on a storage that does not exist yet."""
    path = _study_file(tmp_path, "two_shells", n_trials=6)
    env = {"OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [_study(path, tmp_path, env, "-q", "-w", "1") for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-4000:]
        assert "database is locked" not in out
    trials = _check_consistent(env["OPTUNA_STORAGE"], "two_shells", env["MLFLOW_TRACKING_URI"])
    finished = [t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    # Each shell stops once the study has 6 finished trials; both may be mid-trial then.
    assert 6 <= len(finished) <= 7
