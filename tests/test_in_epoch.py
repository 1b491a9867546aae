"""Pruning decisions inside the epoch (``search.report_every``): the study file's rules, the
pruner's steps, the report sequence of a real study, and a pruning decision at a quarter
epoch — real Keras training on small subsets, a real Optuna storage and MLflow store."""
from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt import data
from mnist_opt.reporting.trial_cost import epochs_trained
from mnist_opt.search.objective import callback_factory
from mnist_opt.search.runner import run_study
from mnist_opt.search.samplers import make_pruner
from mnist_opt.study.config import InvalidStudyFile, StudyConfig, load_config
from mnist_opt.study.space import suggest_params
from mnist_opt.training.callbacks import InEpochReports, TrialCallback
from mnist_opt.training.loop import fresh_model, study_split, train

# 1,000 images, val 0.2: 800 training images in batches of 40 = 20 steps per epoch, so the
# quarters fall on whole compiled calls (5 steps each) and their epochs are exact
SPACE = {"n_layers": 1, "units": 32, "batch_size": 40, "learning_rate": 3.0e-3}


def _study_file(tmp_path: Path, name: str = "quarters", max_epochs: float = 2,
                **search) -> Path:
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000},
           "search": {"sampler": "random", "pruner": "none", "n_trials": 1, "seed": 3,
                      "report_every": 0.25, "report_val_images": 100, **search},
           "training": {"max_epochs": max_epochs}, "space": dict(SPACE)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("search, path, says", [
    ({"report_every": 0.3}, "search.report_every", "allowed: 1, 0.5, 0.25"),
    ({"report_every": 1.5}, "search.report_every", "less than or equal to 1"),
    ({"report_every": 1, "min_resource": 0.5}, "search.min_resource", "use a multiple of 1"),
    ({"report_every": 0.5, "min_resource": 0.25}, "search.min_resource", "multiple of 0.5"),
    ({"min_resource": 0}, "search.min_resource", "greater than 0"),
    ({"report_every": 1, "max_epochs": 2.5}, "training.max_epochs", "use a multiple of 1"),
    ({"report_every": 0.5, "max_epochs": 1.25}, "training.max_epochs", "multiple of 0.5"),
    ({"max_epochs": 0}, "training.max_epochs", "greater than 0"),
])
def test_report_settings_that_do_not_make_whole_steps_are_refused(tmp_path, search, path, says):
    with pytest.raises(InvalidStudyFile) as err:
        load_config(_study_file(tmp_path, **search))
    assert [p.path for p in err.value.problems] == [path]
    assert says in str(err.value) and "quarters.yaml" in str(err.value)


def test_the_pruners_count_reports_while_the_study_file_counts_epochs(tmp_path):
    cfg = load_config(_study_file(tmp_path, pruner="hyperband", min_resource=0.25))
    pruner = make_pruner(cfg)
    assert (pruner._min_resource, pruner._max_resource) == (1, 8)  # 0.25 and 2 epochs
    fraction = make_pruner(load_config(_study_file(tmp_path, pruner="hyperband",
                                                   max_epochs=1.75)))
    assert fraction._max_resource == 7
    median = make_pruner(load_config(_study_file(tmp_path, pruner="median", n_warmup_steps=1)))
    assert median._n_warmup_steps == 4


def test_one_report_per_epoch_keeps_the_search_section_and_digest_of_older_files(tmp_path):
    """Studies begun before report_every existed continue as the same version."""
    every_epoch = load_config(_study_file(tmp_path, report_every=1, min_resource=1))
    section = every_epoch.search_section()["search"]
    assert "report_every" not in section and "report_val_images" not in section
    assert section["min_resource"] == 1 and isinstance(section["min_resource"], int)
    quarters = load_config(_study_file(tmp_path, min_resource=0.25))
    assert quarters.search_section()["search"]["report_every"] == 0.25
    assert quarters.digest != every_epoch.digest


def test_the_validation_slice_is_fixed_and_stratified(tmp_path):
    cfg = load_config(_study_file(tmp_path))
    split = study_split(cfg)
    factory = callback_factory(cfg, split, verbose=False)
    first, second = factory(optuna.trial.FixedTrial({})), factory(optuna.trial.FixedTrial({}))
    assert isinstance(first, InEpochReports) and first.reports_per_epoch == 4
    x, y = first.val_slice
    shares = 100 * np.bincount(split.y_val, minlength=10) / len(split.y_val)
    assert len(y) == 100 and np.all(np.abs(np.bincount(y, minlength=10) - shares) <= 1)
    assert x is second.val_slice[0]  # drawn once, the same images for every trial
    plain = callback_factory(load_config(_study_file(tmp_path, report_every=1)), split, False)
    assert type(plain(optuna.trial.FixedTrial({}))) is TrialCallback


def _params(cfg: StudyConfig) -> dict:
    """The study's one configuration (every parameter is fixed, by the file or the table)."""
    return suggest_params(optuna.trial.FixedTrial({}), cfg)


def test_slice_metrics_agree_with_keras_evaluate(tmp_path):
    cfg = load_config(_study_file(tmp_path))
    split, params = study_split(cfg), _params(cfg)
    model = fresh_model(params, seed=0)
    train(model, params, (split.x_train, split.y_train), None, 1)
    callback = InEpochReports(None, 4, (split.x_val, split.y_val))
    callback.set_model(model)
    loss, accuracy = model.evaluate(split.x_val, split.y_val, verbose=0)
    assert callback.slice_metrics(batch_size=64) == pytest.approx(
        {"val_accuracy": accuracy, "val_loss": loss}, rel=1e-4)


def test_a_study_reports_each_quarter_and_the_full_validation_set_at_epoch_ends(stores, tmp_path):
    cfg = load_config(_study_file(tmp_path))
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == list(range(1, 9))  # 2 epochs × 4 reports
    log = trial.user_attrs["epoch_log"]  # completed epochs only: time to target's statistic
    assert [trial.intermediate_values[s] for s in (4, 8)] == pytest.approx([a for _, a in log])
    assert trial.value == pytest.approx(log[-1][1])
    client, run_id = MlflowClient(), trial.user_attrs["mlflow_run_id"]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    assert history("val_accuracy") == pytest.approx({4: log[0][1], 8: log[1][1]})
    assert sorted(history("loss")) == [4, 8]
    slices = history("slice_val_accuracy")
    assert slices == pytest.approx({s: trial.intermediate_values[s] for s in (1, 2, 3, 5, 6, 7)})
    assert history("epoch") == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75, 4: 1, 5: 1.25, 6: 1.5,
                                              7: 1.75, 8: 2})


def test_the_pruner_can_stop_a_trial_after_a_quarter_epoch(stores, tmp_path):
    """A median pruner with one finished trial at 0.99 at every step prunes a real trial at
    its first report, a quarter into the first epoch, on the validation slice."""
    cfg = load_config(_study_file(tmp_path, pruner="median", n_startup_trials=2,
                                  n_warmup_steps=0))
    split, params = study_split(cfg), _params(cfg)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    study.add_trial(optuna.trial.create_trial(
        value=0.99, intermediate_values={s: 0.99 for s in range(1, 9)}))
    trial = study.ask()
    callback = callback_factory(cfg, split, verbose=False)(trial)
    with mlflow.start_run(), pytest.raises(optuna.TrialPruned, match="at epoch 0.25"):
        train(fresh_model(params, seed=0), params, (split.x_train, split.y_train),
              (split.x_val, split.y_val), 2, [callback], reports_per_epoch=4)
    reported = study.trials[-1].intermediate_values
    assert list(reported) == [1] and reported[1] < 0.99
    attrs = study.trials[-1].user_attrs
    assert "epoch_log" not in attrs and attrs["pruned_at_epoch"] == 0.25  # no epoch completed


class _Batches(keras.callbacks.Callback):
    """The last batch each epoch reached (batch hooks come once per compiled call)."""

    def __init__(self):
        super().__init__()
        self.reached: dict[int, int] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.reached[self.epoch] = batch + 1


def test_a_fractional_max_epochs_stops_part_way_through_the_last_epoch(stores, tmp_path):
    """max_epochs 1.5: the second epoch stops at its half (10 of 20 steps), Keras still
    measures the full validation set there, and that is the last report, at step 6, and the
    trial's value; the study file keeps 2 as an int (digests of older files unchanged)."""
    assert isinstance(load_config(_study_file(tmp_path)).training.max_epochs, int)
    cfg = load_config(_study_file(tmp_path, max_epochs=1.5))
    counter = _Batches()
    split, params = study_split(cfg), _params(cfg)
    history = train(fresh_model(params, seed=0), params, (split.x_train, split.y_train),
                    (split.x_val, split.y_val), 1.5, [counter], reports_per_epoch=4)
    assert counter.reached == {0: 20, 1: 10} and len(history.history["val_accuracy"]) == 2
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == list(range(1, 7))  # 1.5 epochs × 4 reports
    log = trial.user_attrs["epoch_log"]
    assert trial.value == pytest.approx(trial.intermediate_values[6]) == pytest.approx(log[-1][1])
    assert trial.user_attrs["epochs"] == 1.5 and epochs_trained(trial) == 1.5
    history_of = {m.step: m.value for m in MlflowClient().get_metric_history(
        trial.user_attrs["mlflow_run_id"], "epoch")}
    assert history_of == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75, 4: 1, 5: 1.25, 6: 1.5})
