"""Subset search, then promotion (``search.promote``): real studies on small subsets, a real
SQLite storage and MLflow store."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.reporting.report import table
from mnist_opt.search.runner import run_study
from mnist_opt.study.config import InvalidStudyFile, load_config
from mnist_opt.study.objectives import PROMOTED, PROMOTED_BEST, top_complete
from mnist_opt.training.loop import study_split
from mnist_opt.training.retrain import best_trial


def _file(tmp_path: Path, n_trials: int = 4, **search) -> Path:
    """Trials search 300 of the study's 1,000 images for one epoch; promotion trains the
    top 2 on all 800 training images for 2 epochs."""
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000, "search_subset": 300},
           "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "seed": 5,
                      "promote": {"top_k": 2, "epochs": 2}, **search},
           "training": {"max_epochs": 1},
           "space": {"n_layers": 1, "units": {"low": 8, "high": 64, "log": True},
                     "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
                     "batch_size": 50}}
    path = tmp_path / "subset.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _promote_runs(study_name: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(study_name)
    return client.search_runs([exp.experiment_id], "tags.promoted = 'true'")


def test_the_top_k_are_retrained_on_the_full_split_and_the_winner_is_the_pick(stores,
                                                                               tmp_path):
    cfg = load_config(_file(tmp_path))
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    top = top_complete(study, 2)
    promoted = study.user_attrs[PROMOTED]
    assert sorted(promoted) == sorted(str(t.number) for t in top)
    runs = {r.data.tags["trial_number"]: r for r in _promote_runs(cfg.name)}
    assert sorted(runs) == sorted(promoted)
    for number, result in promoted.items():
        run = runs[number]
        assert run.data.metrics["val_accuracy"] == pytest.approx(result["val_accuracy"])
        assert run.data.params["n_train"] == "800" and result["epochs"] == 2
        assert run.data.metrics["epoch"] == 2
        # when each epoch ended and its accuracy: compare's time to target counts them
        log = result["epoch_log"]
        assert len(log) == 2 and log[0][0] < log[1][0]
        assert log[-1][1] == pytest.approx(result["val_accuracy"])
    winner = max(promoted, key=lambda n: promoted[n]["val_accuracy"])
    assert study.user_attrs[PROMOTED_BEST] == int(winner)
    assert best_trial(cfg, stores["storage"]).number == int(winner)  # retrain's choice
    from mnist_opt.training.retrain import retrain

    res = retrain(cfg, stores["storage"], verbose=False)
    assert res.trial_number == int(winner)
    assert res.val_accuracy == pytest.approx(promoted[winner]["val_accuracy"])
    assert f"retrain takes trial {winner}" in table(study, 5, 0.005)
    full, trials = study_split(cfg, full=True), study_split(cfg)
    assert (len(full.y_train), len(trials.y_train)) == (800, 300)
    # one validation split for the trials, the promotion and retrain's report
    assert trials.x_val is full.x_val or (trials.y_val == full.y_val).all()
    assert len(trials.y_val) == 200 and cfg.data.search_subset == 300
    # the results table's search time includes the promotion, which ran after the study run
    from mnist_opt.reporting.results import _line, study_row

    client = MlflowClient()
    row = study_row(client, cfg)
    promote_run, = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                      "tags.`mnist_opt.kind` = 'promote'")
    took = (promote_run.info.end_time - promote_run.info.start_time) / 1000
    assert row["promote_s"] == pytest.approx(took) and took > 0
    assert row["search_s"] > row["promote_s"]
    assert f"(promotion {took / 60:.1f})" in _line(row)


def test_a_top_k_above_the_complete_trials_promotes_all_of_them(stores, tmp_path, capsys):
    """top_k 5 of 3 trials: all 3 are promoted; a pruned trial is not, though the top 5 has
    room for it."""
    import optuna

    from mnist_opt.search.promote import promote

    cfg = load_config(_file(tmp_path, n_trials=3, promote={"top_k": 5, "epochs": 1}))
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3  # no pruner
    assert "promoting 3 of the top 3 configurations" in capsys.readouterr().out
    promoted = study.user_attrs[PROMOTED]
    assert sorted(promoted) == sorted(str(t.number) for t in complete)
    assert sorted(r.data.tags["trial_number"] for r in _promote_runs(cfg.name)) == \
           sorted(promoted)
    best = max(promoted, key=lambda n: (promoted[n]["val_accuracy"], -int(n)))
    assert study.user_attrs[PROMOTED_BEST] == int(best)
    # a pruned trial with a higher last value than any: not COMPLETE, so not promoted
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params=complete[0].params,
        distributions=complete[0].distributions, intermediate_values={0: 0.999}))
    lines: list[str] = []
    result = promote(cfg, study, out=lines.append)
    assert sorted(n for n in result if n != "best") == sorted(promoted)
    assert not any(line.startswith("promoting") for line in lines)  # nothing left to train
    assert len(_promote_runs(cfg.name)) == 3


def test_a_rerun_promotes_only_what_is_missing(stores, tmp_path):
    cfg = load_config(_file(tmp_path))
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert len(_promote_runs(cfg.name)) == 2
    run_study(cfg, stores["storage"], verbose=False, progress=False)  # nothing missing
    assert len(_promote_runs(cfg.name)) == 2
    promoted = study.user_attrs[PROMOTED]
    kept = dict(list(promoted.items())[:1])  # as if interrupted after the first
    study.set_user_attr(PROMOTED, kept)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert len(_promote_runs(cfg.name)) == 3
    assert study.user_attrs[PROMOTED][next(iter(kept))] == kept[next(iter(kept))]
    assert sorted(study.user_attrs[PROMOTED]) == sorted(promoted)


def test_promotion_needs_one_objective(tmp_path):
    path = _file(tmp_path, second_objective="n_params", pruner="none")
    with pytest.raises(InvalidStudyFile, match="search.promote"):
        load_config(path)


def test_promote_settings_do_not_change_what_the_study_searches(tmp_path):
    with_promote = load_config(_file(tmp_path)).digest
    doc = yaml.safe_load(_file(tmp_path).read_text())
    del doc["search"]["promote"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(doc))
    assert load_config(tmp_path / "plain.yaml").digest == with_promote


def test_a_changed_promotion_budget_trains_them_again(stores, tmp_path):
    cfg = load_config(_file(tmp_path))
    run_study(cfg, stores["storage"], verbose=False, progress=False)
    longer = load_config(_file(tmp_path, promote={"top_k": 2, "epochs": 3}))
    study = run_study(longer, stores["storage"], verbose=False, progress=False)
    assert {r["epochs"] for r in study.user_attrs[PROMOTED].values()} == {3}
    assert len(_promote_runs(cfg.name)) == 4
    fewer = load_config(_file(tmp_path, promote={"top_k": 1, "epochs": 3}))
    study = run_study(fewer, stores["storage"], verbose=False, progress=False)
    assert list(study.user_attrs[PROMOTED]) == [str(top_complete(study, 1)[0].number)]
    assert len(_promote_runs(cfg.name)) == 4  # the best one's result is kept
