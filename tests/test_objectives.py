"""Two objectives: validation accuracy and model size, a Pareto front, and a stated pick rule."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.study.config import find_study, load_config, with_overrides
from mnist_opt.errors import StudyFileError
from mnist_opt.study.objectives import pick
from mnist_opt.reporting.report import table
from mnist_opt.training.retrain import retrain
from mnist_opt.search.runner import run_study

ROOT = Path(__file__).resolve().parent.parent


def _study(points: list[tuple[float, float]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, size in points:
        study.add_trial(optuna.trial.create_trial(values=[acc, size], params={},
                                                  distributions={}))
    return study


def test_pick_takes_the_smallest_model_within_tolerance_of_the_best_accuracy():
    #          0: best acc     1: on front, 0.004 worse, small   2: on front, too far behind
    study = _study([(0.980, 900_000), (0.976, 120_000), (0.960, 20_000), (0.970, 500_000)])
    assert sorted(t.number for t in study.best_trials) == [0, 1, 2]  # 3 is dominated by 1
    assert pick(study, 0.005).number == 1
    assert pick(study, 0.001).number == 0  # only the best is close enough
    assert pick(study, 0.05).number == 2
    lines = table(study, top=4, tolerance=0.005).splitlines()
    marks = {line[1:].split()[0]: line[0] for line in lines[1:5]}
    assert marks == {"0": "*", "1": ">", "2": "*", "3": " "}


def test_two_objectives_refuse_a_pruner(tmp_path: Path):
    doc = yaml.safe_load((ROOT / "studies" / "mlp_size_tpe.yaml").read_text())
    doc["search"]["pruner"] = "hyperband"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StudyFileError, match="pruner: none") as err:
        load_config(path)
    assert str(path) in str(err.value) and "second_objective" in str(err.value)


@pytest.mark.e2e
def test_size_study_keeps_a_front_and_retrain_takes_the_picked_trial(stores):
    cfg = with_overrides(find_study("mlp_size_tpe"), n_trials=4, max_epochs=1, train_subset=1500)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:  # the second objective is the model's real parameter count
        assert t.values[1] == t.user_attrs["n_params"] and t.user_attrs["epochs"] == 1
    chosen = pick(study, cfg.search.pick_tolerance)
    client = MlflowClient()
    parent = client.get_run(study.user_attrs["last_mlflow_parent_run_id"])
    assert parent.data.tags["best_trial"] == str(chosen.number)
    assert parent.data.metrics["pareto_front_size"] == len(study.best_trials)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/pareto_front.html", "plots/pareto_front.png"} <= plots
    res = retrain(cfg, stores["storage"], verbose=False)
    run = client.get_run(res.run_id)
    assert res.trial_number == chosen.number
    assert "smallest n_params on the Pareto front" in run.data.tags["pick_rule"]
    assert float(run.data.tags["source_n_params"]) == chosen.values[1]


def test_nsga2_sampler_for_two_objectives():
    from mnist_opt.search.samplers import make_sampler

    cfg = find_study("mlp_size_tpe")
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"sampler": "nsga2"})})
    sampler = make_sampler(cfg)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)


def test_latency_objective_times_a_real_forward_pass():
    from mnist_opt.training.models import build_model
    from mnist_opt.study.objectives import latency_ms

    small = build_model({"n_layers": 1, "units_l0": 16, "dropout_l0": 0.0, "batch_norm": False,
                         "activation": "relu"})
    big = build_model({"n_layers": 3, **{f"units_l{i}": 2048 for i in range(3)},
                       **{f"dropout_l{i}": 0.0 for i in range(3)}, "batch_norm": False,
                       "activation": "relu"})
    fast, slow = latency_ms(small), latency_ms(big)
    assert 0 < fast < 1000 and 0 < slow < 1000
    assert slow > fast  # 10M multiply-adds per image against 13k
