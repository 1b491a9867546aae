"""Search spaces on real Optuna studies: conditional params, fixed params, retrain, grid."""
from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
import yaml

from mnist_opt.study.config import find_study, load_config
from mnist_opt.search.samplers import make_sampler
from mnist_opt.study.space import grid_space, suggest_params

STUDIES = Path(__file__).resolve().parent.parent / "studies"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _asked(cfg, n: int, seed: int = 0):
    """``n`` (trial, params) pairs from a seeded random sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest_params(trial, cfg)
        study.tell(trial, 0.0)
        out.append((trial, params))
    return out


@pytest.fixture(scope="module")
def mlp_tpe():
    return find_study("mlp_tpe", STUDIES)


@pytest.fixture(scope="module")
def mlp_tpe_trials(mlp_tpe):
    return _asked(mlp_tpe, 150)


def test_per_layer_params_follow_n_layers(mlp_tpe_trials):
    depths = set()
    for trial, params in mlp_tpe_trials:
        n = params["n_layers"]
        depths.add(n)
        assert 1 <= n <= 3
        for i in range(4):
            for key in (f"units_l{i}", f"dropout_l{i}"):
                assert (key in params) == (i < n), (key, params)
                assert (key in trial.params) == (i < n), (key, trial.params)
        assert all(64 <= params[f"units_l{i}"] <= 1024 for i in range(n))
        assert all(isinstance(params[f"units_l{i}"], int) for i in range(n))
    assert depths == {1, 2, 3}


def test_conditional_training_params(mlp_tpe_trials):
    seen = set()
    for trial, params in mlp_tpe_trials:
        exponential = params["lr_schedule"] == "exponential"
        adamw = params["optimizer"] == "adamw"
        seen.add((exponential, adamw))
        assert ("lr_decay" in params) == exponential
        assert ("lr_decay" in trial.params) == exponential
        assert ("weight_decay" in params) == adamw
        assert ("weight_decay" in trial.params) == adamw
    assert seen == {(a, b) for a in (True, False) for b in (True, False)}


def test_full_params_keys(mlp_tpe_trials):
    _, params = mlp_tpe_trials[0]
    for key in ("n_layers", "batch_norm", "activation", "optimizer", "learning_rate",
                "batch_size", "lr_schedule"):
        assert key in params


def test_mlp_hyperband_fixed_architecture():
    cfg = find_study("mlp_hyperband", STUDIES)
    for trial, params in _asked(cfg, 5):
        assert params["n_layers"] == 4
        assert [params[f"units_l{i}"] for i in range(4)] == [82, 4, 76, 12]
        assert params["batch_norm"] is True
        assert "n_layers" not in trial.params
        assert not any(k.startswith("units_") for k in trial.params)
        for i in range(4):
            assert f"dropout_l{i}" in trial.params
            assert 0.0 <= params[f"dropout_l{i}"] <= 0.5
        assert "dropout_l4" not in params
        assert set(trial.params) == {"dropout_l0", "dropout_l1", "dropout_l2", "dropout_l3",
                                     "learning_rate"}


@pytest.mark.parametrize("name", ["mlp_tpe", "mlp_hyperband", "cnn_gp", "fashion_cnn_tpe"])
def test_fixed_trial_reproduces_params(name: str):
    """The retrain path: trial.params through a FixedTrial rebuilds the full params dict."""
    cfg = find_study(name, STUDIES)
    for trial, params in _asked(cfg, 20, seed=3):
        assert suggest_params(optuna.trial.FixedTrial(trial.params), cfg) == params


# --- grid --------------------------------------------------------------------------------

GRID_STUDY = {
    "dataset": "mnist",
    "model": "mlp",
    "search": {"sampler": "grid", "pruner": "none", "seed": 1},
    "space": {
        "n_layers": {"choices": [1, 2]},
        "units": {"choices": [32, 64]},
        "learning_rate": {"low": 0.001, "high": 0.01, "grid": [0.001, 0.01]},
        "dropout": 0.0,
        "batch_norm": False,
        "activation": "relu",
        "optimizer": "adam",
        "batch_size": 128,
    },
}


@pytest.fixture
def grid_cfg(tmp_path: Path):
    path = tmp_path / "tiny_grid.yaml"
    path.write_text(yaml.safe_dump(GRID_STUDY))
    return load_config(path)


def test_grid_space(grid_cfg):
    assert grid_space(grid_cfg) == {
        "n_layers": [1, 2],
        "units_l0": [32, 64],
        "units_l1": [32, 64],
        "learning_rate": [0.001, 0.01],
    }


def test_grid_space_int_range_with_step(tmp_path: Path):
    doc = {**GRID_STUDY, "space": {**GRID_STUDY["space"], "n_layers": 1,
                                   "units": {"low": 32, "high": 96, "step": 32}}}
    path = tmp_path / "step_grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert grid_space(load_config(path)) == {"units_l0": [32, 64, 96], "learning_rate": [0.001, 0.01]}


def test_grid_sampler_covers_every_combination(grid_cfg):
    sampler = make_sampler(grid_cfg)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=sampler)
    visited = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, grid_cfg)
        visited.append(tuple(sorted(trial.params.items())))
        return params["learning_rate"]

    # 2 depths × 2 × 2 units × 2 rates = 16 grid points; the sampler stops the study there.
    study.optimize(objective, n_trials=40)
    assert len(study.trials) == 16
    expected = set()
    for n, lr in itertools.product([1, 2], [0.001, 0.01]):
        for units in itertools.product([32, 64], repeat=n):
            combo = {"n_layers": n, "learning_rate": lr}
            combo.update({f"units_l{i}": u for i, u in enumerate(units)})
            expected.add(tuple(sorted(combo.items())))
    assert set(visited) == expected  # 4 one-layer + 8 two-layer combinations
    assert len(expected) == 12


def test_grid_first_trials_are_distinct(grid_cfg):
    """Before the grid is exhausted no grid point repeats (8 trials: 8 different grid ids)."""
    study = optuna.create_study(sampler=make_sampler(grid_cfg))
    study.optimize(lambda t: suggest_params(t, grid_cfg)["learning_rate"], n_trials=8)
    ids = [t.system_attrs["grid_id"] for t in study.trials]
    assert len(ids) == 8 and len(set(ids)) == 8
