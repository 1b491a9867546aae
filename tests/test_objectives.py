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
from mnist_opt.study.space import suggest_params
from mnist_opt.training.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def _search(cfg, **update):
    """``cfg`` with its ``search`` section updated (sampler, n_startup_trials…)."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update=update)})


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
@pytest.mark.slow
def test_size_study_keeps_a_front_and_retrain_takes_the_picked_trial(stores, random_proposals):
    # two random start-up trials, then two of the multi-objective TPE's
    cfg = _search(with_overrides(find_study("mlp_size_tpe"), n_trials=4, max_epochs=1,
                                 train_subset=1000), n_startup_trials=2)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Multi-objective TPE is univariate (it records nothing in the trial): its trials show
    # by differing from what the seeded random start-up sampler would have drawn next.
    random = random_proposals(cfg, 4)
    assert [t.params for t in trials[:2]] == random[:2]
    assert all(t.params != r for t, r in zip(trials[2:], random[2:]))
    for t in trials:  # the second objective is the parameter count of the trial's model,
        # counted again here on a model rebuilt from the trial's params
        params = suggest_params(optuna.trial.FixedTrial(t.params), cfg)
        assert t.values[1] == build_model(params).count_params() and t.user_attrs["epochs"] == 1
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


@pytest.mark.e2e
@pytest.mark.slow
def test_nsga2_sampler_breeds_a_second_generation(stores, random_proposals):
    """The study file's n_startup_trials is NSGA-II's population size: 2 random trials, then
    2 children of them (crossover and mutation), in the study the runner builds."""
    cfg = _search(with_overrides(find_study("mlp_size_tpe"), n_trials=4, max_epochs=1,
                                 train_subset=600), sampler="nsga2", n_startup_trials=2)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    key = optuna.samplers.NSGAIISampler._get_generation_key()
    assert [t.system_attrs[key] for t in trials] == [0, 0, 1, 1]
    random = random_proposals(cfg, 4)
    assert [t.params for t in trials[:2]] == random[:2]  # generation 0: random
    parents = trials[:2]
    for child, drawn in zip(trials[2:], random[2:]):
        assert child.params != drawn  # not the random sampler's next draw
        # crossover copies each parameter from a parent, mutation redraws about one in n:
        # most of a child's values are a parent's (a random draw's float values never are)
        shared = set(child.params).intersection(*(p.params for p in parents))
        inherited = [k for k in shared
                     if any(child.params[k] == pytest.approx(p.params[k]) for p in parents)]
        assert len(inherited) > len(shared) / 2, (child.params, [p.params for p in parents])


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
