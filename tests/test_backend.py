"""``training.backend``: auto chooses from a planted calibration; a study trains on the chosen
backend in its worker processes; a model trained on JAX loads and predicts the same classes in
a TensorFlow-backend process, directly and through MLflow; ``mnist-opt calibrate`` measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.errors import MnistOptError
from mnist_opt.study.config import StudyConfig
from mnist_opt.training import backend

# later epochs 3× faster on JAX, the first one 2 s slower: JAX pays from the 6th epoch on
PLANTED = {"families": {"mlp": {"tensorflow": {"first_s": 2.0, "later_s": 0.6},
                                "jax": {"first_s": 4.0, "later_s": 0.2}}}}


def _cfg(model: str = "mlp", pruner: str = "none", max_epochs: int = 10, **training) -> StudyConfig:
    return StudyConfig(name="b", dataset="mnist", model=model, space={},
                       search={"pruner": pruner, "min_resource": 1, "reduction_factor": 3},
                       training={"max_epochs": max_epochs, **training})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MNIST_OPT_CACHE", str(tmp_path))
    return tmp_path


def test_expected_epochs_follow_successive_halving_by_hand():
    assert backend.expected_epochs(_cfg(max_epochs=7)) == 7
    # η = 3, 1…9 epochs: brackets 0, 1, 2 start at 1, 3, 9 epochs; a trial goes on to each
    # next rung with probability 1/3: 1 + 2/3 + 6/9, 3 + 6/3, 9; their mean is 49/9
    assert backend.expected_epochs(_cfg(pruner="hyperband", max_epochs=9)) == pytest.approx(49 / 9)


@pytest.mark.parametrize("pruner, max_epochs, chosen", [
    ("none", 10, "jax"),          # 10 epochs: 2 + 9 × 0.6 = 7.4 s vs 4 + 9 × 0.2 = 5.8 s
    ("none", 3, "tensorflow"),    # 3.2 s vs 4.4 s
    ("hyperband", 9, "tensorflow"),  # 49/9 epochs expected: 4.67 s vs 4.89 s
])
def test_auto_picks_the_faster_backend_for_the_trials_the_study_expects(cache, pruner,
                                                                         max_epochs, chosen):
    (cache / "calibration.json").write_text(json.dumps(PLANTED))
    got, why = backend.choose(_cfg(pruner=pruner, max_epochs=max_epochs))
    assert got == chosen and why.startswith(f"{chosen} (auto:")


def test_epochs_are_scaled_from_the_calibrations_images_to_the_studys(cache):
    """JAX timed on 5,400 images at 0.2 s an epoch takes 2 s on a study's 54,000: TensorFlow
    (timed on 54,000) wins a 10-epoch trial there, which unscaled it would lose."""
    tf = {"first_s": 2.0, "later_s": 0.6, "n_train": 54000}
    jax = {"first_s": 4.0, "later_s": 0.2, "n_train": 5400}
    (cache / "calibration.json").write_text(json.dumps(
        {"families": {"mlp": {"tensorflow": tf, "jax": jax}}}))
    assert backend.train_images(_cfg()) == 54000
    assert backend.trial_seconds(tf, 10, 54000) == pytest.approx(1.4 + 10 * 0.6)
    assert backend.trial_seconds(jax, 10, 54000) == pytest.approx(3.8 + 10 * 2.0)
    assert backend.trial_seconds(jax, 10) == pytest.approx(3.8 + 10 * 0.2)  # unscaled: 5.8 s
    assert backend.choose(_cfg())[0] == "tensorflow"
    small = _cfg().model_copy(update={"data": _cfg().data.model_copy(
        update={"search_subset": 6000})})
    assert backend.train_images(small) == 6000  # of the split's 54,000 training images


def test_auto_without_a_calibration_is_tensorflow_and_says_how_to_get_one(cache):
    got, why = backend.choose(_cfg())
    assert got == "tensorflow" and "mnist-opt calibrate" in why
    (cache / "calibration.json").write_text(json.dumps(PLANTED))
    assert backend.choose(_cfg(model="cnn"))[0] == "tensorflow"  # only mlp was calibrated
    assert backend.choose(_cfg(backend="jax")) == ("jax", "jax (training.backend)")


def test_a_damaged_calibration_names_the_file_and_the_fix(cache):
    (cache / "calibration.json").write_text('{"families": {"mlp": {"jax": {}}}}')
    with pytest.raises(MnistOptError, match=r"calibration\.json is not a calibration.*"
                                            r"run `mnist-opt calibrate` again"):
        backend.choose(_cfg())


def test_a_process_whose_keras_runs_on_another_backend_is_refused():
    assert keras.backend.backend() == "tensorflow"
    backend.apply("tensorflow")
    with pytest.raises(MnistOptError, match="already running on tensorflow.*KERAS_BACKEND=jax"):
        backend.apply("jax")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "1"], "--epochs must be at least 2"),
    (["--train-subset", "50"], "--train-subset must be at least 100 images"),
])
def test_calibrate_refuses_bad_arguments_before_timing_anything(cache, capsys, argv, message):
    from mnist_opt.cli.main import main

    assert main(["calibrate", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (cache / "calibration.json").exists()


def test_the_backend_is_not_part_of_what_a_study_searches():
    assert _cfg(backend="jax").digest == _cfg(backend="tensorflow").digest == _cfg().digest


TRAIN_ON_JAX = """
import sys
from pathlib import Path
from mnist_opt.training.backend import apply
apply("jax")  # as `mnist-opt` does, before anything imports Keras
import mlflow, numpy as np, optuna
from mnist_opt.quiet import import_tensorflow
import_tensorflow()
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
from mnist_opt import data
from mnist_opt.study.config import StudyConfig
from mnist_opt.study.space import suggest_params
from mnist_opt.tracking import runs as tracking
from mnist_opt.training.loop import fresh_model, train
out = Path(sys.argv[1])
cfg = StudyConfig(name="x", dataset="mnist", model="mlp", space={})
params = suggest_params(optuna.trial.FixedTrial({}), cfg)
ds = data.load("mnist")
x, y = data.to_float(ds.x_train[:2000]), ds.y_train[:2000].astype("int32")
model = fresh_model(params, seed=0)
train(model, params, (x, y), None, 1)
model.save(out / "model.keras")
with mlflow.start_run() as run:
    tracking.log_model(model)
np.save(out / "classes.npy", np.asarray(model.predict(data.to_float(ds.x_test[:500]),
                                                      verbose=0)).argmax(axis=1))
print(run.info.run_id)
"""


@pytest.mark.slow
def test_a_model_trained_on_jax_predicts_the_same_in_a_tensorflow_process(stores, tmp_path):
    from mnist_opt import data

    proc = subprocess.run([sys.executable, "-c", TRAIN_ON_JAX, str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuInit" not in proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    before = np.load(tmp_path / "classes.npy")
    images = data.to_float(data.load("mnist").x_test[:500])
    assert keras.backend.backend() == "tensorflow"  # this process
    direct = keras.saving.load_model(tmp_path / "model.keras")
    assert (np.asarray(direct.predict(images, verbose=0)).argmax(axis=1) == before).all()
    logged = mlflow.keras.load_model(f"runs:/{run_id}/model")
    assert (np.asarray(logged.predict(images, verbose=0)).argmax(axis=1) == before).all()
    assert (before == data.load("mnist").y_test[:500]).mean() > 0.5  # it learned (chance: 0.1)
    reqs = (Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")) /
            "requirements.txt").read_text()
    assert "jax==" in reqs and "tensorflow==" in reqs


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])  # in the command's process; in worker processes
def test_a_study_trains_on_the_backend_auto_chose_in_every_worker(stores, tmp_path, cache,
                                                                   workers):
    (cache / "calibration.json").write_text(json.dumps(PLANTED))
    study = {"dataset": "mnist", "model": "mlp", "data": {"train_subset": 1200},
             "search": {"sampler": "random", "pruner": "none", "n_trials": 3, "seed": 3},
             "training": {"max_epochs": 7},  # 7 epochs: 5.6 s vs 5.2 s planted, JAX wins
             "space": {"units": {"low": 16, "high": 32}}}
    path = tmp_path / "onjax.yaml"
    path.write_text(yaml.safe_dump(study))
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "study", str(path), "-q",
                           "--workers", workers], env=os.environ.copy(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "backend jax (auto: a 7.0-epoch mlp trial, calibrated: tensorflow 5.6 s, jax 5.2 s)" \
        in proc.stdout
    client = MlflowClient(stores["tracking"])
    exp = client.get_experiment_by_name("onjax")
    trials = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'trial'")
    assert len(trials) == 3
    assert {r.data.tags["keras_backend"] for r in trials} == {"jax"}
    parent = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'study'")
    assert parent[0].data.params["backend"] == "jax"


@pytest.mark.slow
def test_calibrate_times_both_backends_and_keeps_other_families(cache):
    (cache / "calibration.json").write_text(json.dumps(
        {"families": {"cnn": {"tensorflow": {"first_s": 9.0, "later_s": 8.0}}}}))
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "calibrate", "--families", "mlp",
                           "--epochs", "2", "--train-subset", "1200"], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((cache / "calibration.json").read_text())
    assert doc["families"]["cnn"]["tensorflow"]["first_s"] == 9.0
    for name in backend.BACKENDS:
        timing = doc["families"]["mlp"][name]
        assert timing["first_s"] > timing["later_s"] > 0  # the first epoch traces/compiles
        assert timing["n_train"] == 1080  # 1,200 images less the validation tenth
    assert doc["epochs"] == 2 and doc["train_subset"] == 1200 and doc["seconds"] > 0
    assert f"calibrated mlp in {doc['seconds']:.0f} s" in proc.stdout
