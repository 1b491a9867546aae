"""Schedules and regularisers as searchable parameters (issue 14 point 1): one-cycle with
cycled momentum, cosine with warm-up, SGDW's decoupled weight decay, label smoothing.

The closed-form formulas are written out here, independently of ``training.schedules``, and
compared with what the optimizer holds after real ``fit`` steps; the models are trained for
real on small subsets, logged to a real MLflow store and loaded in a fresh process.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest
import yaml

from mnist_opt.search.runner import run_study
from mnist_opt.study.config import InvalidStudyFile, load_config
from mnist_opt.study.params import OPTIMIZERS, table
from mnist_opt.training import schedules
from mnist_opt.training.callbacks import InEpochReports
from mnist_opt.training.loop import (compile_model, evaluate, fresh_model, make_dataset,
                                     make_optimizer, study_split, train)

# 1,000 images, val 0.2: 800 training images in batches of 40 = 20 steps per epoch
BASE = {"n_layers": 1, "units_l0": 16, "dropout_l0": 0.0, "batch_norm": False, "activation": "relu",
        "batch_size": 40, "learning_rate": 0.01, "label_smoothing": 0.0}
ONE_CYCLE = {"lr_schedule": "one_cycle", "warmup_fraction": 0.3, "div_factor": 25.0,
             "final_div": 1e4, "momentum_low": 0.85, "momentum_high": 0.95}


def expected_one_cycle(step: int, p: dict, total: int) -> tuple[float, float]:
    """Learning rate and momentum at ``step`` (0-based) of ``total``: linear up to the peak
    over round(warmup_fraction × total) steps (momentum linear down), then half a cosine down
    to peak / div_factor / final_div (momentum back up along the same cosine)."""
    peak, warm = p["learning_rate"], round(p["warmup_fraction"] * total)
    start = peak / p["div_factor"]
    end = start / p["final_div"]
    low, high = p["momentum_low"], p["momentum_high"]
    if step < warm:
        f = step / warm
        return start + (peak - start) * f, high - (high - low) * f
    c = (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm)))) / 2
    return end + (peak - end) * c, low + (high - low) * (1 - c)


def expected_cosine(step: int, peak: float, warmup: float, total: int) -> float:
    warm = round(warmup * total)
    if step < warm:
        return peak * step / warm
    return peak * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm)))) / 2


class Reads(keras.callbacks.Callback):
    """The optimizer's step, learning rate and (one-cycle) momentum wherever Keras calls
    back: after every compiled call of 8 steps (steps_per_execution), not every batch."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, float, float | None]] = []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        momentum = (float(opt.cycled_momentum()) if isinstance(opt, schedules.CycledMomentum)
                    else None)
        self.seen.append((int(opt.iterations), float(opt.learning_rate), momentum))


def _split():
    """The study files' split: 800 training and 200 validation images, stratified."""
    from mnist_opt import data

    return data.split(data.load("mnist"), 0.2, 1, 1000)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw", "sgdw"])
def test_one_cycle_lr_and_momentum_follow_the_closed_form_after_real_fit_steps(optimizer):
    split = _split()
    params = {**BASE, **ONE_CYCLE, "optimizer": optimizer, "weight_decay": 1e-4}
    reads = Reads()
    train(fresh_model(params, seed=0), params, (split.x_train, split.y_train), None, 3, [reads])
    total = 3 * 20
    steps = [s for s, _, _ in reads.seen]
    assert steps[:3] == [8, 16, 20] and steps[-1] == total  # every 8th step and epoch ends
    for step, lr, momentum in reads.seen:
        want_lr, want_momentum = expected_one_cycle(step, params, total)
        assert lr == pytest.approx(want_lr, rel=1e-5)
        assert momentum == pytest.approx(want_momentum, rel=1e-5)
    # the shape: momentum lowest where the learning rate peaks (step 18 of 60)
    assert expected_one_cycle(18, params, total) == pytest.approx((0.01, 0.85))


def test_cosine_with_warm_up_follows_the_closed_form_after_real_fit_steps():
    split = _split()
    params = {**BASE, "optimizer": "adam", "lr_schedule": "cosine", "cosine_warmup": 0.25}
    reads = Reads()
    train(fresh_model(params, seed=0), params, (split.x_train, split.y_train), None, 2, [reads])
    assert len(reads.seen) >= 4
    for step, lr, momentum in reads.seen:
        assert momentum is None
        assert lr == pytest.approx(expected_cosine(step, 0.01, 0.25, 40), rel=1e-5, abs=1e-9)


def _numpy_sgd(variable, grads, lrs, momenta):
    """Keras' Nesterov SGD by hand: m = μm − ηg; w += μm − ηg."""
    w, m = variable.copy(), np.zeros_like(variable)
    for g, lr, mu in zip(grads, lrs, momenta):
        m = mu * m - lr * g
        w = w + mu * m - lr * g
    return w


def _numpy_adam(variable, grads, lrs, betas, beta_2=0.999, eps=1e-7):
    """Keras' Adam by hand, with the step's β1 in both the average and its correction."""
    w, m, v = variable.copy(), np.zeros_like(variable), np.zeros_like(variable)
    for t, (g, lr, b1) in enumerate(zip(grads, lrs, betas), start=1):
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - beta_2)
        alpha = lr * math.sqrt(1 - beta_2 ** t) / (1 - b1 ** t)
        w = w - m * alpha / (np.sqrt(v) + eps)
    return w


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_cycled_momentum_is_the_one_each_update_uses(optimizer):
    """Three updates of one variable by the one-cycle optimizer against the update rule
    written out with the closed form's learning rate and momentum of each step."""
    params = {**BASE, **ONE_CYCLE, "optimizer": optimizer, "warmup_fraction": 0.5}
    opt = make_optimizer(params, steps_per_epoch=4, epochs=1)  # 4 steps, 2 rising
    start = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    variable = keras.Variable(start)
    grads = [np.array(g, dtype=np.float32) for g in ([0.3, -0.1, 0.2], [0.1, 0.4, -0.3],
                                                     [-0.2, 0.2, 0.1])]
    for g in grads:
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    lrs, momenta = zip(*(expected_one_cycle(s, params, 4) for s in range(3)))
    assert momenta[0] == pytest.approx(0.95) and momenta[2] == pytest.approx(0.85)
    rule = _numpy_sgd if optimizer == "sgd" else _numpy_adam
    assert np.asarray(variable) == pytest.approx(rule(start, grads, lrs, momenta), rel=1e-5)


def test_sgdw_decays_weights_decoupled_from_the_gradient():
    """A zero gradient leaves SGD's weights alone; SGDW shrinks them by lr × weight_decay."""
    for name, factor in (("sgd", 1.0), ("sgdw", 1 - 0.1 * 0.01)):
        opt = make_optimizer({**BASE, "optimizer": name, "learning_rate": 0.1,
                              "weight_decay": 0.01, "lr_schedule": "none"}, 20)
        variable = keras.Variable(np.array([2.0, -4.0], dtype=np.float32))
        opt.apply_gradients([(keras.ops.zeros((2,)), variable)])
        assert np.asarray(variable) == pytest.approx(np.array([2.0, -4.0]) * factor, rel=1e-6)
    assert set(OPTIMIZERS) == {"adam", "sgd", "adamw", "sgdw", "rmsprop"}


def test_label_smoothing_trains_on_one_hot_targets_and_reports_plain_accuracy():
    split = _split()
    params = {**BASE, "optimizer": "adam", "lr_schedule": "none", "label_smoothing": 0.1}
    model = fresh_model(params, seed=0)
    history = train(model, params, (split.x_train, split.y_train),
                    (split.x_val, split.y_val), 1)
    probs = np.asarray(model(split.x_val, training=False))
    accuracy = float(np.mean(probs.argmax(axis=1) == split.y_val))
    assert history.history["val_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)
    smoothed = np.full((len(split.y_val), 10), 0.1 / 10)
    smoothed[np.arange(len(split.y_val)), split.y_val] += 0.9
    loss = float(np.mean(-(smoothed * np.log(np.clip(probs, 1e-7, 1))).sum(axis=1)))
    assert evaluate(model, split.x_val, split.y_val) == pytest.approx(
        {"loss": loss, "accuracy": accuracy}, rel=1e-4)
    # the in-epoch reports' slice measures the same smoothed loss
    reports = InEpochReports(None, 4, (split.x_val, split.y_val))
    reports.set_model(model)
    assert reports.slice_metrics() == pytest.approx({"val_loss": loss, "val_accuracy": accuracy},
                                                    rel=1e-4)


def _study_file(tmp_path: Path, **space) -> Path:
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 1000},
           "search": {"sampler": "grid", "pruner": "none", "n_trials": 4, "seed": 3},
           "training": {"max_epochs": 2},
           "space": {"n_layers": 1, "units": 16, "batch_size": 40, "learning_rate": 0.01,
                     **space}}
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("space, where, says", [
    ({"lr_schedule": "one_cycle", "warmup_fraction": 0.95}, "space.warmup_fraction",
     "[0, 0.9]"),
    ({"lr_schedule": "none", "div_factor": 10.0}, "space.div_factor", "lr_schedule"),
    ({"label_smoothing": 0.7}, "space.label_smoothing", "[0, 0.5]"),
    ({"optimizer": "sgdx"}, "space.optimizer", "sgdw"),
    ({"lr_schedule": "one_cycle", "momentum_high": 0.0}, "space.momentum_high", "[0.5, 0.999]"),
])
def test_recipe_values_outside_the_table_are_refused(tmp_path, space, where, says):
    with pytest.raises(InvalidStudyFile) as err:
        load_config(_study_file(tmp_path, **space))
    assert where in str(err.value) and says in str(err.value)


LOAD = """
import json, sys
import numpy as np, mlflow
x = np.load(sys.argv[1])
out = {}
for uri in sys.argv[2:]:
    out[uri] = np.asarray(mlflow.pyfunc.load_model(uri).predict(x)).argmax(axis=1).tolist()
assert "mnist_opt" not in sys.modules  # loaded without our package: only Keras' own objects
print(json.dumps(out))
"""


def test_each_recipe_trains_in_a_study_and_its_mlflow_model_loads_in_a_fresh_process(
        stores, tmp_path):
    """Four trials, a grid over one-cycle/cosine × Adam/SGDW with label smoothing: each
    model, loaded through MLflow by a process that never imports mnist_opt, classifies the
    validation images as well as the trial measured."""
    path = _study_file(tmp_path, lr_schedule={"choices": ["one_cycle", "cosine"]},
                       optimizer={"choices": ["adam", "sgdw"]}, label_smoothing=0.1,
                       cosine_warmup=0.2)
    cfg = load_config(path)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted((t.params["lr_schedule"], t.params["optimizer"]) for t in trials) == [
        ("cosine", "adam"), ("cosine", "sgdw"), ("one_cycle", "adam"), ("one_cycle", "sgdw")]
    split = study_split(cfg)
    np.save(tmp_path / "x_val.npy", split.x_val)
    uris = {f"runs:/{t.user_attrs['mlflow_run_id']}/model": t for t in trials}
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "x_val.npy"), *uris],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads(proc.stdout.strip().splitlines()[-1])
    for uri, trial in uris.items():
        accuracy = float(np.mean(np.array(predicted[uri]) == split.y_val))
        assert accuracy == pytest.approx(trial.user_attrs["val_accuracy"], abs=1e-6)
        assert accuracy > 0.2  # it learned (chance: 0.1)
    assert "weight_decay" in table("mlp") and table("mlp")["weight_decay"].when[1] == (
        "adamw", "sgdw")


SAVE_LOAD = """
import sys
import keras, numpy as np
import mnist_opt.training.schedules  # registers the one-cycle optimizers
model = keras.saving.load_model(sys.argv[1])
opt = model.optimizer
print(type(opt).__name__, int(opt.iterations), float(opt.learning_rate), float(opt.cycled_momentum()))
"""


def test_a_one_cycle_model_saves_and_loads_with_its_optimizer_mid_cycle(tmp_path):
    """Compiled for a 3-epoch cycle, trained one epoch, saved; a fresh process that imports
    mnist_opt loads the optimizer at step 20 of 60 with the closed form's values there."""
    split = _split()
    params = {**BASE, **ONE_CYCLE, "optimizer": "adamw", "weight_decay": 1e-4}
    model = compile_model(fresh_model(params, seed=0), params, len(split.y_train), 8, epochs=3)
    model.fit(make_dataset(split.x_train, split.y_train, 40, shuffle_seed=0), epochs=1,
              verbose=0)
    model.save(tmp_path / "m.keras")
    proc = subprocess.run([sys.executable, "-c", SAVE_LOAD, str(tmp_path / "m.keras")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, step, lr, momentum = proc.stdout.strip().splitlines()[-1].split()
    assert (name, int(step)) == ("OneCycleAdamW", 20)
    assert (float(lr), float(momentum)) == pytest.approx(expected_one_cycle(20, params, 60),
                                                         rel=1e-5)


def test_label_smoothing_with_a_val_loss_metric_is_refused(tmp_path):
    path = _study_file(tmp_path, label_smoothing={"low": 0.0, "high": 0.2})
    doc = yaml.safe_load(path.read_text())
    doc["search"].update(metric="val_loss", direction="minimize")
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InvalidStudyFile, match="space.label_smoothing.*val_loss"):
        load_config(path)


def test_momentum_bounds_in_either_order_give_the_one_cycle_shape():
    params = {**BASE, **ONE_CYCLE, "optimizer": "sgd", "momentum_low": 0.95,
              "momentum_high": 0.85}
    opt = make_optimizer(params, steps_per_epoch=10, epochs=1)
    assert (opt.momentum_low, opt.momentum_high) == (0.85, 0.95)
