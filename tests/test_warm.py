"""Known configurations first (``search.enqueue``) and warm starts from another study
(``--warm-start``): real studies on 600 images, a real SQLite storage and MLflow store."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.errors import MnistOptError
from mnist_opt.search.objective import summary
from mnist_opt.search.slots import n_finished
from mnist_opt.search.runner import run_study
from mnist_opt.search.warm import KIND, SOURCE, copied
from mnist_opt.study.config import InvalidStudyFile, load_config
from mnist_opt.study.space import check_enqueue

State = optuna.trial.TrialState


def _file(tmp_path: Path, name: str, n_trials: int = 3, max_epochs: int = 1,
          units: dict | None = None, **search) -> Path:
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 600},
           "search": {"sampler": "random", "pruner": "none", "n_trials": n_trials, "seed": 3,
                      **search},
           "training": {"max_epochs": max_epochs},
           "space": {"n_layers": 1, "units": units or {"low": 8, "high": 64, "log": True},
                     "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                     "batch_size": 64}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(path: Path, storage: str, **kwargs) -> optuna.Study:
    return run_study(load_config(path), storage, verbose=False, progress=False, **kwargs)


def test_enqueued_configurations_run_first_once_and_are_tagged(stores, tmp_path):
    known = {"units_l0": 40, "learning_rate": 0.005}
    path = _file(tmp_path, "known", n_trials=2, enqueue=[known])
    study = _run(path, stores["storage"])
    first = study.trials[0]
    assert {k: first.params[k] for k in known} == known
    assert first.user_attrs["enqueued_from"] == "search.enqueue"
    tags = MlflowClient().get_run(first.user_attrs["mlflow_run_id"]).data.tags
    assert tags["enqueued_from"] == "search.enqueue"
    # continued with a higher target: the configuration is not queued again
    study = _run(_file(tmp_path, "known", n_trials=3, enqueue=[known]), stores["storage"],
                 mix=True)
    assert sum(t.params.get("units_l0") == 40 for t in study.trials) == 1
    assert len(study.trials) == 3


@pytest.mark.parametrize("values, key, says", [
    ({"units_l0": 500}, "search.enqueue[0].units_l0", "500 is not in the space: an integer in [8, 64]"),
    ({"learning_rate": "fast"}, "search.enqueue[0].learning_rate", "[0.001, 0.01]"),
    ({"units_l3": 16}, "search.enqueue[0].units_l3", "not a searched parameter"),
    ({"batch_size": 64}, "search.enqueue[0].batch_size", "searched: learning_rate, units_l0"),
])
def test_enqueued_values_outside_the_space_are_refused_before_anything_runs(stores, tmp_path,
                                                                           values, key, says):
    path = _file(tmp_path, "bad", enqueue=[values])
    with pytest.raises(InvalidStudyFile) as err:
        check_enqueue(load_config(path))
    assert key in str(err.value) and says in str(err.value) and "bad.yaml" in str(err.value)
    with pytest.raises(InvalidStudyFile):
        _run(path, stores["storage"])
    assert optuna.get_all_study_names(stores["storage"]) == []  # nothing was created
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "check", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and key in proc.stdout + proc.stderr


def test_a_warm_start_copies_the_best_trials_which_do_not_count_toward_n_trials(stores,
                                                                                tmp_path):
    source = _run(_file(tmp_path, "source", n_trials=3), stores["storage"])
    best = sorted(source.trials, key=lambda t: -t.value)[:2]
    study = _run(_file(tmp_path, "target", n_trials=2), stores["storage"], warm_from="source",
                 warm_top=2)
    copies = [t for t in study.trials if copied(t)]
    assert sorted(t.user_attrs[SOURCE] for t in copies) == sorted(f"source#{t.number}"
                                                                  for t in best)
    assert sorted((t.params["units_l0"], t.value) for t in copies) == sorted(
        (t.params["units_l0"], t.value) for t in best)
    assert len(study.trials) == 4 and n_finished(study) == 2  # 2 copies + its own 2
    client = MlflowClient()
    for t in copies:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags[KIND] == "copied" and run.info.status == "FINISHED"
        assert run.data.metrics["val_accuracy"] == pytest.approx(t.value)
    parent = client.get_run(study.user_attrs["last_mlflow_parent_run_id"])
    assert parent.data.params["warm_start_copied"] == "2"
    # continued with the same warm start: nothing is copied twice
    study = _run(_file(tmp_path, "target", n_trials=3), stores["storage"], warm_from="source",
                 warm_top=2, mix=True)
    assert sum(copied(t) for t in study.trials) == 2 and n_finished(study) == 3


def test_the_end_of_run_summary_counts_copied_trials_apart(stores, tmp_path, capsys):
    """`mnist-opt study --warm-start`: the copies are neither complete nor pruned trials of
    this study (n_trials leaves them out too), in the line it prints and the study run's
    metrics; the best trial may still be one of them."""
    from mnist_opt.cli.main import main

    _run(_file(tmp_path, "origin", n_trials=3), stores["storage"])
    path = _file(tmp_path, "seeded", n_trials=2)
    rc = main(["study", str(path), "--warm-start", "origin", "--warm-top", "2", "-w", "1", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert ("study seeded: 2 complete, 0 pruned, 0 failed trials in storage (target: 2 "
            "finished), and 2 copied by a warm start (not counted toward it); this run") in out
    study = optuna.load_study(study_name="seeded", storage=stores["storage"])
    assert len(study.trials) == 4 and n_finished(study) == 2
    result = summary(study, 0.0)
    assert (result["complete"], result["pruned"], result["fail"], result["copied"]) == \
           (2, 0, 0, 2)
    # the best of all four, copies included (a copy's value measures the same)
    assert result["best_value"] == pytest.approx(max(t.value for t in study.trials))
    assert result["best_trial"] == study.best_trial.number
    metrics = MlflowClient().get_run(study.user_attrs["last_mlflow_parent_run_id"]).data.metrics
    assert {k: metrics[k] for k in ("n_complete", "n_pruned", "n_fail", "n_copied")} == \
           {"n_complete": 2, "n_pruned": 0, "n_fail": 0, "n_copied": 2}


def test_a_warm_start_from_a_study_that_measured_differently_queues_its_trials(stores,
                                                                               tmp_path):
    """max_epochs differs, so the values mean something else: the best configuration runs
    anew, as an ordinary trial that counts."""
    source = _run(_file(tmp_path, "short", n_trials=2), stores["storage"])
    best = max(source.trials, key=lambda t: t.value)
    study = _run(_file(tmp_path, "longer", n_trials=2, max_epochs=2), stores["storage"],
                 warm_from="short", warm_top=1)
    first = study.trials[0]
    assert not any(copied(t) for t in study.trials) and len(study.trials) == 2
    assert first.user_attrs[KIND] == "enqueued" and first.params == best.params
    assert first.state == State.COMPLETE and len(first.user_attrs["epoch_log"]) == 2


def test_a_warm_start_names_what_is_wrong(stores, tmp_path, capsys):
    path = _file(tmp_path, "alone")
    with pytest.raises(MnistOptError, match="no study 'nowhere'"):
        _run(path, stores["storage"], warm_from="nowhere")
    with pytest.raises(MnistOptError, match="names the study itself"):
        _run(path, stores["storage"], warm_from="alone")
    from mnist_opt.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["study", str(path), "--warm-start", "x", "--warm-top", "0"])
    assert exit_.value.code == 2 and "not a positive integer" in capsys.readouterr().err


def test_a_new_version_of_a_changed_file_starts_from_the_old_one(stores, tmp_path):
    """The narrowed space: the old best configurations run anew, a value outside the new
    range left to the sampler."""
    from mnist_opt.search.versions import new_version
    from mnist_opt.tracking.storage import make_storage

    old = _run(_file(tmp_path, "grow", n_trials=2), stores["storage"])
    cfg = new_version(load_config(_file(tmp_path, "grow", n_trials=2,
                                        units={"low": 8, "high": 16})),
                      make_storage(stores["storage"]))
    assert cfg.name == "grow.v2"
    study = run_study(cfg, stores["storage"], verbose=False, progress=False, warm_from="grow",
                      warm_top=2)
    seeded = [t for t in study.trials if t.user_attrs.get(KIND) == "enqueued"]
    assert len(seeded) == 2 and len(study.trials) == 2
    by_source = {t.user_attrs[SOURCE]: t for t in seeded}
    for t in old.trials:
        here = by_source[f"grow#{t.number}"]
        assert here.params["learning_rate"] == t.params["learning_rate"]
        assert 8 <= here.params["units_l0"] <= 16  # sampled where the old value is outside
        if t.params["units_l0"] <= 16:
            assert here.params["units_l0"] == t.params["units_l0"]


def test_a_changed_recipe_or_a_missing_choice_queues_instead_of_copying(stores, tmp_path):
    """The source ran a fixed batch of 64 and a choice this study lacks: nothing is copied
    (a fixed entry is no distribution, yet it changes what the values mean), and the
    choice it lacks is left to the sampler instead of failing."""
    source = _file(tmp_path, "wide", n_trials=2)
    doc = yaml.safe_load(source.read_text())
    doc["space"]["activation"] = {"choices": ["elu"]}  # a choice the target lacks
    source.write_text(yaml.safe_dump(doc))
    old = _run(source, stores["storage"])
    doc["space"]["activation"] = {"choices": ["relu", "gelu"]}
    doc["space"]["batch_size"] = 32
    target = tmp_path / "narrow.yaml"
    target.write_text(yaml.safe_dump(doc))
    study = run_study(load_config(target), stores["storage"], verbose=False, progress=False,
                      warm_from="wide", warm_top=2)
    assert not any(copied(t) for t in study.trials)
    queued = [t for t in study.trials if t.user_attrs.get(KIND) == "enqueued"]
    assert len(queued) == 2 and all(t.params["activation"] in ("relu", "gelu") for t in queued)
    assert "activation" not in queued[0].system_attrs.get("fixed_params", {})
    by_source = {t.user_attrs[SOURCE]: t for t in queued}
    for t in old.trials:
        assert by_source[f"wide#{t.number}"].params["units_l0"] == t.params["units_l0"]
