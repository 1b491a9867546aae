"""``mnist-opt compare`` with keras-tuner's tuners beside our own strategies: the names, the
errors (keras-tuner missing, more than one worker), and one tiny end-to-end comparison whose
keras-tuner repeat leaves the same records in its Optuna study as ours."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.search import strategies as strat
from mnist_opt.search.strategies import (KT_TUNERS, Budget, KerasTunerStrategy, OptunaStrategy,
                                         StrategyError, check_workers, parse_strategies, plan)
from mnist_opt.study.config import load_config
from test_compare import _env, _epochs, _file, _repeats  # tests/ is on sys.path (pytest)

ROOT = Path(__file__).resolve().parent.parent
needs_kt = pytest.mark.skipif(not strat.keras_tuner_installed(),
                              reason="keras-tuner is not installed: pip install -e '.[bench]' "
                                     "(or `make bench`) to run the keras-tuner comparison")


def test_kt_names_are_strategies_beside_sampler_plus_pruner(monkeypatch):
    monkeypatch.setattr(strat, "keras_tuner_installed", lambda: True)
    got = parse_strategies(["KT-Hyperband", "tpe+none", "kt-bayesian", "kt-random"])
    assert [s.label for s in got] == ["kt-hyperband", "tpe+none", "kt-bayesian", "kt-random"]
    assert [type(s) for s in got] == [KerasTunerStrategy, OptunaStrategy, KerasTunerStrategy,
                                      KerasTunerStrategy]
    assert [s.tuner for s in got if isinstance(s, KerasTunerStrategy)] == [
        "Hyperband", "BayesianOptimization", "RandomSearch"]
    with pytest.raises(StrategyError) as err:
        parse_strategies(["kt-hyperbnd", "kt-random"])
    assert "'kt-hyperbnd' (did you mean 'kt-hyperband'?)" in str(err.value)
    assert f"keras-tuner's {', '.join(KT_TUNERS)}" in str(err.value)
    with pytest.raises(StrategyError, match="twice"):
        parse_strategies(["kt-random", "KT-RANDOM"])
    # keras-tuner as its documentation starts a user: a strategy of its own
    both = parse_strategies(["kt-bayesian", "kt-bayesian-defaults"])
    assert [(s.label, s.tuner, s.defaults) for s in both] == [
        ("kt-bayesian", "BayesianOptimization", False),
        ("kt-bayesian-defaults", "BayesianOptimization", True)]
    assert ["--defaults" in s.command(Path("f.yaml"), "sqlite:///x.db", 1, False)
            for s in both] == [False, True]
    with pytest.raises(StrategyError) as err:
        parse_strategies(["kt-bayesian-default"])
    assert "add -defaults for its defaults" in str(err.value)


def test_kt_strategies_without_keras_tuner_say_how_to_install_it(monkeypatch):
    monkeypatch.setattr(strat, "keras_tuner_installed", lambda: False)
    with pytest.raises(StrategyError) as err:
        parse_strategies(["tpe+none", "kt-random", "kt-bayesian"])
    msg = str(err.value)
    assert "kt-random, kt-bayesian need keras-tuner" in msg
    assert "pip install -e '.[bench]'" in msg and "make bench" in msg
    assert [s.label for s in parse_strategies(["tpe+none"])] == ["tpe+none"]  # not needed


def test_kt_strategies_refuse_more_than_one_worker(monkeypatch):
    monkeypatch.setattr(strat, "keras_tuner_installed", lambda: True)
    both = parse_strategies(["tpe+hyperband", "kt-hyperband"])
    check_workers(both, 1)
    check_workers(both[:1], 4)
    with pytest.raises(StrategyError) as err:
        check_workers(both, 2)
    assert "kt-hyperband runs in one process" in str(err.value)
    assert "no local parallel mode" in str(err.value) and "--workers 1" in str(err.value)


def test_a_kt_repeat_has_the_studys_space_its_seed_and_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(strat, "keras_tuner_installed", lambda: True)
    cfg = load_config(_file(tmp_path))
    repeats = plan(cfg, parse_strategies(["kt-bayesian"]), 2, Budget(epochs=4), tmp_path / "o",
                   max_epochs=2)
    assert [(r.name, r.seed) for r in repeats] == [("tiny.cmp.kt-bayesian.r0", 3),
                                                   ("tiny.cmp.kt-bayesian.r1", 4)]
    for r in repeats:
        assert (r.config.search.epoch_budget, r.config.training.max_epochs) == (4, 2)
        assert r.config.space == cfg.space and r.config.search.n_startup_trials == 2
        command = r.strategy.command(r.study_file, "sqlite:///x.db", 1, False)
        assert command[1:] == ["-m", "mnist_opt.search.kt_repeat", str(r.study_file),
                               "--storage", "sqlite:///x.db", "--tuner", "kt-bayesian"]


def test_kt_strategies_refuse_a_fractional_max_epochs(tmp_path, monkeypatch):
    """keras-tuner trains whole epochs; a study of 1.5 (half-epoch reports) is refused by
    name, while our strategies run it."""
    monkeypatch.setattr(strat, "keras_tuner_installed", lambda: True)
    doc = yaml.safe_load(_file(tmp_path).read_text())
    doc["search"]["report_every"], doc["training"]["max_epochs"] = 0.5, 1.5
    (path := tmp_path / "half.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert plan(cfg, parse_strategies(["random+none"]), 1, Budget(trials=1), tmp_path / "o")
    with pytest.raises(StrategyError) as err:
        plan(cfg, parse_strategies(["kt-random"]), 1, Budget(trials=1), tmp_path / "o")
    assert "keras-tuner trains whole epochs" in str(err.value) and "1.5" in str(err.value)


def test_compare_exits_2_for_kt_with_two_workers_and_writes_nothing(stores, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "compare", str(_file(tmp_path)),
                           "--strategies", "random+none", "kt-random", "--workers", "2",
                           "--budget-epochs", "2"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("keras-tuner" in proc.stderr and ("no local parallel mode" in proc.stderr
                                              or "pip install -e '.[bench]'" in proc.stderr))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns", "tiny.yaml"]


@needs_kt
@pytest.mark.e2e
@pytest.mark.slow
def test_compare_runs_keras_tuner_beside_an_optuna_strategy(stores, tmp_path):
    storage = stores["storage"]
    command = [sys.executable, "-m", "mnist_opt", "compare", str(_file(tmp_path)),
               "--strategies", "random+none", "kt-random", "--repeats", "1",
               "--budget-epochs", "2", "--storage", storage]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    repeats = _repeats(storage)
    assert sorted(repeats) == ["tiny.cmp.kt-random.r0", "tiny.cmp.random-none.r0"]
    assert all(s.user_attrs["compare_finished"] is True for s in repeats.values())

    kt = repeats["tiny.cmp.kt-random.r0"]
    trials = kt.get_trials(deepcopy=False)
    epochs = _epochs(kt)
    assert len(epochs) >= 2 and sum(t.user_attrs["epochs"] for t in trials) == len(epochs)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:  # the study's space, with its distributions; the best epoch as value
        assert set(t.params) == {"units_l0"} and 16 <= t.params["units_l0"] <= 32
        assert isinstance(t.distributions["units_l0"], optuna.distributions.IntDistribution)
        assert t.value == max(acc for _, acc in t.user_attrs["epoch_log"])
        assert 0 < t.value <= 1
    assert kt.user_attrs["compare_clock_start"] < min(e[0] for e in epochs)

    folder = tmp_path / "reports" / "compare" / "tiny"
    md = (folder / "summary.md").read_text()
    assert "| kt-random | 1 |" in md and "| random+none | 1 |" in md
    rows = {r["strategy"]: r for r in json.loads((folder / "summary.json").read_text())["rows"]}
    assert rows["kt-random"]["epochs_median"] == len(epochs)
    assert rows["kt-random"]["final_best_median"] == pytest.approx(max(a for _, a in epochs))

    # its own MLflow run, nested under the compare run beside ours, with its curve
    client = MlflowClient()
    exp = client.get_experiment_by_name("compare-tiny")
    parent = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'compare'")[0]
    nested = {r.data.tags["optuna.study_name"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(nested) == sorted(repeats)
    run = nested["tiny.cmp.kt-random.r0"]
    assert run.info.status == "FINISHED" and run.data.tags["mnist_opt.tool"] == "keras-tuner"
    assert run.data.params["tuner"] == "kt-random"
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(max(a for _, a in epochs))
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.value for m in history) == pytest.approx(sorted(a for _, a in epochs))


@needs_kt
@pytest.mark.e2e
@pytest.mark.slow
def test_kt_defaults_with_a_trial_budget_stop_after_that_many_trials(stores, tmp_path):
    """keras-tuner out of the box (NumPy fit, its own Hyperband iterations) under
    ``--budget-trials``: exactly that many keras-tuner trials, recorded like ours."""
    storage = stores["storage"]
    command = [sys.executable, "-m", "mnist_opt", "compare", str(_file(tmp_path)),
               "--strategies", "kt-hyperband-defaults", "--repeats", "1",
               "--budget-trials", "3", "--max-epochs", "3", "--storage", storage]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    study = _repeats(storage)["tiny.cmp.kt-hyperband-defaults.r0"]
    assert study.user_attrs["compare_setup"]["n_trials"] == 3
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Hyperband's first bracket: each trial says how far it trained
    assert all(t.user_attrs["kt_hyperband"]["epochs"] <= 3 for t in trials)
    log = (tmp_path / "reports" / "compare" / "tiny" / "logs"
           / "tiny.cmp.kt-hyperband-defaults.r0.log").read_text()
    assert "--defaults" in log.splitlines()[0]
