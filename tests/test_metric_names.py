"""`open_study` names the study's objective values (Optuna's ``set_metric_names``), so
optuna-dashboard, Optuna's plots and ``trials_dataframe`` say "val_accuracy", not "values_0"."""
from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from mnist_opt.search.runner import open_study
from mnist_opt.study.config import find_study
from mnist_opt.tracking.storage import make_storage

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, names", [("mlp_tpe", ["val_accuracy"]),
                                         ("mlp_size_tpe", ["val_accuracy", "n_params"])])
def test_open_study_sets_metric_names(tmp_path, monkeypatch, name, names):
    monkeypatch.setenv("MNIST_OPT_STUDIES", str(ROOT / "studies"))
    cfg = find_study(name)
    assert cfg.objective_names == names
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study, _ = open_study(cfg, make_storage(url))
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert study.metric_names == names

    # Stored, not only on this object: another process loading the study sees the names.
    loaded = optuna.load_study(study_name=cfg.name, storage=url)
    assert loaded.metric_names == names
    trial = loaded.ask()
    loaded.tell(trial, [0.9, 1000.0][:len(names)])
    prefix = "value" if len(names) == 1 else "values"  # unnamed: "value", "values_0", …
    columns = [c for c in loaded.trials_dataframe().columns if c.startswith("value")]
    assert columns == [f"{prefix}_{n}" for n in names]

    # Continuing the study opens it again: the names stay, nothing is duplicated.
    again, _ = open_study(cfg, make_storage(url))
    assert again.metric_names == names and len(again.trials) == 1


def test_a_fresh_study_has_no_names_without_open_study(tmp_path):
    """What open_study fixes: a study created directly has no metric names."""
    study = optuna.create_study(study_name="bare", storage=f"sqlite:///{tmp_path / 'bare.db'}")
    assert study.metric_names is None
