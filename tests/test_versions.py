"""A changed study file is refused, naming what changed, until the user mixes knowingly or
starts a new version — real studies in a real SQLite storage and MLflow store."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.search.runner import run_study
from mnist_opt.search.versions import StudyChangedError
from mnist_opt.study.config import find_study, load_config, section_changes



def _file(tmp_path: Path, units_high: int = 32, n_trials: int = 1) -> Path:
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 600},
           "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "seed": 3},
           "training": {"max_epochs": 1},
           "space": {"n_layers": 1, "units": {"low": 16, "high": units_high}}}
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _parent_runs(name: str) -> int:
    exp = MlflowClient().get_experiment_by_name(name)
    return 0 if exp is None else len(MlflowClient().search_runs(
        [exp.experiment_id], "tags.`mnist_opt.kind` = 'study'"))


def test_section_changes_name_each_key_old_and_new():
    old = {"space": {"units": {"low": 16, "high": 32}, "dropout": 0.1}, "search": {"sampler": "tpe"}}
    new = {"space": {"units": {"low": 16, "high": 64}}, "search": {"sampler": "tpe"}}
    assert section_changes(old, new) == ["space.dropout: 0.1 → (absent)",
                                         "space.units.high: 32 → 64"]
    assert section_changes(old, old) == []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_widened_range_is_refused_until_mixed_knowingly(stores, tmp_path):
    run_study(load_config(_file(tmp_path)), stores["storage"], verbose=False, progress=False)
    assert _parent_runs("grow") == 1
    wider = load_config(_file(tmp_path, units_high=64, n_trials=2))
    with pytest.raises(StudyChangedError) as err:
        run_study(wider, stores["storage"], verbose=False, progress=False)
    msg = str(err.value)
    assert "space.units.high: 32.0 → 64.0" in msg
    assert "--mix-versions" in msg and "--new-version" in msg and "\n" not in msg
    study = optuna.load_study(study_name="grow", storage=stores["storage"])
    assert len(study.trials) == 1 and _parent_runs("grow") == 1  # nothing written
    # a study that already has its target runs nothing, so nothing is mixed: no refusal
    done = run_study(load_config(_file(tmp_path, units_high=64)), stores["storage"],
                     verbose=False, progress=False)
    assert len(done.trials) == 1 and done.user_attrs["config_digest"] != wider.digest

    # raising n_trials alone is not a change: only the budget grew
    same = load_config(_file(tmp_path, n_trials=2))
    assert same.digest == study.user_attrs["config_digest"]

    study = run_study(wider, stores["storage"], verbose=False, progress=False, mix=True)
    assert len(study.trials) == 2
    mixed = study.user_attrs["mixed_versions"]
    assert mixed[-1]["changed"] == ["space.units.high: 32.0 → 64.0"]
    assert study.user_attrs["config_digest"] == wider.digest
    exp = MlflowClient().get_experiment_by_name("grow")
    latest = MlflowClient().search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'study'",
                                        order_by=["attributes.start_time DESC"])[0]
    assert "space.units.high" in latest.data.params["mixed_versions"]
    section = MlflowClient().download_artifacts(latest.info.run_id, "search_section.json",
                                                str(tmp_path))
    assert yaml.safe_load(Path(section).read_text())["space"]["units"]["high"] == 64


@pytest.mark.e2e
@pytest.mark.slow
def test_a_study_from_before_is_changed_with_keys_unknown(stores, tmp_path):
    cfg = load_config(_file(tmp_path))
    study = optuna.create_study(study_name="grow", storage=stores["storage"])
    study.set_user_attr("config_digest", "0123456789abcdef")  # what older versions stored
    with pytest.raises(StudyChangedError, match="changed, keys unknown"):
        run_study(cfg, stores["storage"], verbose=False, progress=False)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_opt", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.slow
def test_new_version_is_its_own_study_everywhere(stores, tmp_path, monkeypatch):
    path = _file(tmp_path)
    assert _cli(tmp_path, "study", str(path), "-q").returncode == 0
    _file(tmp_path, units_high=64, n_trials=2)  # a new range, and trials to run with it
    refused = _cli(tmp_path, "study", str(path), "-q")
    assert refused.returncode == 2 and "space.units.high" in refused.stderr

    first = _cli(tmp_path, "study", str(path), "-q", "--new-version")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "is study grow.v2" in first.stdout
    names = optuna.get_all_study_names(stores["storage"])
    assert sorted(names) == ["grow", "grow.v2"]
    assert MlflowClient().get_experiment_by_name("grow.v2") is not None
    again = _cli(tmp_path, "study", str(path), "-q", "--new-version", "--n-trials", "3")
    assert again.returncode == 0 and "is study grow.v2" in again.stdout  # continued, no v3
    v2 = optuna.load_study(study_name="grow.v2", storage=stores["storage"])
    assert len(v2.trials) == 3
    assert len(optuna.load_study(study_name="grow", storage=stores["storage"]).trials) == 1
    # the version's name finds the file and the study: report (and retrain) take it
    monkeypatch.setenv("MNIST_OPT_STUDIES", str(tmp_path))
    report = _cli(tmp_path, "report", "grow.v2")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "3 trials: 3 complete" in report.stdout
    assert (tmp_path / "reports" / "grow.v2" / "optimization_history.html").exists()


def test_a_version_name_finds_its_file(monkeypatch):
    monkeypatch.setenv("MNIST_OPT_STUDIES", str(Path(__file__).resolve().parent.parent / "studies"))
    cfg = find_study("mlp_tpe.v3")
    assert cfg.name == "mlp_tpe.v3" and cfg.path.name == "mlp_tpe.yaml"
    assert cfg.digest == find_study("mlp_tpe").digest
