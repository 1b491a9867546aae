"""`mnist-opt lr-find`: the suggestion rule on synthetic curves, the study-file edit, and real
range tests on a few thousand MNIST images against throw-away stores."""
from __future__ import annotations

import csv
import difflib
import io
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from mnist_opt.training import lrfind
from mnist_opt.cli import main
from mnist_opt.study.config import Range, find_study, load_config
from mnist_opt.errors import StudyFileError
from mnist_opt.study.space import suggest_params

ROOT = Path(__file__).resolve().parent.parent

# A small, fast MLP with Adam and no batch norm: it diverges well below lr 10.
SMALL = """\
description: lr-find test study
dataset: mnist
model: mlp
space:
  n_layers: 1
  units: 64
  optimizer: adam
  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # searched
  batch_size: 32
"""


def _studies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **files: str) -> Path:
    """A studies folder in tmp_path (the repo's files are never edited)."""
    folder = tmp_path / "my_studies"
    folder.mkdir()
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setenv("MNIST_OPT_STUDIES", str(folder))
    return folder


def _lr_find_run(name: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'lr-find'")
    assert len(runs) == 1
    return client, runs[0]


# --- no training ------------------------------------------------------------------------

def test_rule_on_a_u_shaped_curve():
    lrs = np.logspace(-6, 0, 61)  # 10 points per decade; 1e-2 is index 40
    loss = 1 + (np.log10(lrs) + 2) ** 2
    sug = lrfind.suggest(list(lrs), list(loss), 1e-6, 1.0)
    assert sug.lr_min_loss == pytest.approx(1e-2)
    assert (sug.low, sug.high) == (pytest.approx(1e-5), pytest.approx(1e-3))  # min/10, /100
    assert sug.lr_steep < sug.lr_min_loss


def test_steepest_point_is_where_the_loss_falls_fastest():
    x = np.linspace(-6, 0, 121)
    loss = 2.3 - 2 / (1 + np.exp(-4 * (x + 3.5))) + np.exp(3 * (x + 0.5))  # falls at 10^-3.5
    sug = lrfind.suggest(list(10 ** x), list(loss), 1e-6, 1.0)
    assert np.log10(sug.lr_steep) == pytest.approx(-3.5, abs=0.06)
    assert sug.low < sug.lr_steep < sug.high < sug.lr_min_loss


def test_rule_rounds_clamps_and_refuses():
    lrs = np.logspace(-6, 0, 61)
    sug = lrfind.suggest(list(lrs), list(1 + (np.log10(lrs) + 1.23) ** 2), 1e-6, 1.0)
    assert (sug.low, sug.high) == (6.3e-5, 6.3e-3)  # 10^-1.2 / 10 = 0.00631, 2 digits
    low_end = lrfind.suggest(list(lrs), list(1 + (np.log10(lrs) + 4.5) ** 2), 1e-6, 1.0)
    assert low_end.low == 1e-6 and "--min-lr" in low_end.notes[0]  # max/100 < --min-lr: clamped
    still_falling = lrfind.suggest(list(lrs), list(-np.log10(lrs)), 1e-6, 1.0)
    assert still_falling.high == 0.1 and "higher --max-lr" in still_falling.notes[0]
    with pytest.raises(lrfind.LrFindError, match="smaller --min-lr"):
        lrfind.suggest(list(lrs), list(np.log10(lrs) + 7), 1e-6, 1.0)  # rising from the start
    with pytest.raises(lrfind.LrFindError, match="too few"):
        lrfind.suggest([1e-6, 1e-5, 1e-4], [2.0, float("nan"), float("inf")], 1e-6, 1.0)


def test_midpoint_config_of_a_space():
    cfg = find_study("mlp_tpe", ROOT / "studies")
    values = lrfind.midpoint_values(cfg)
    assert values["n_layers"] == 2 and values["units_l0"] == values["units_l1"] == 256
    assert values["dropout_l1"] == pytest.approx(0.25) and values["batch_norm"] is True
    assert values["optimizer"] == "adam" and values["learning_rate"] == pytest.approx(10 ** -2.5)
    params, source, trial = lrfind.tested_params(cfg, None)
    assert "midpoint" in source and trial is None
    assert params["lr_schedule"] == "none" and "lr_decay" not in params


def test_midpoint_uses_each_layers_spec(tmp_path):
    path = tmp_path / "layers.yaml"
    path.write_text("dataset: mnist\nmodel: mlp\nspace:\n  n_layers: {low: 3, high: 3}\n"
                    "  units: [{low: 100, high: 300}, {low: 16, high: 64, log: true}]\n")
    values = lrfind.midpoint_values(load_config(path))
    assert [values[f"units_l{i}"] for i in range(3)] == [200, 32, 32]  # the last spec repeats


def test_yaml_float_reads_back_as_a_float():
    for value in (3.2e-5, 1.0, 0.25, 1e-10):
        text = lrfind.yaml_float(value)
        assert isinstance(yaml.safe_load(text), float) and float(text) == pytest.approx(value)
    assert lrfind.yaml_float(3.2e-5) == "3.2e-5"  # the shipped files' style (1.0e-4)
    # Why: ruamel.yaml (YAML 1.2) spells a plain 1e-5 so that PyYAML (YAML 1.1) reads a string.
    out = io.StringIO()
    YAML().dump({"lr": 1e-5}, out)
    assert yaml.safe_load(out.getvalue()) == {"lr": "1e-05"}


# Comments above, beside and below the learning rate, a blank line, a long flow line.
COMMENTED = """\
# lr-find --apply test study: every comment must survive
description: commented study  # inline, top level
dataset: mnist
model: mlp

space:
  # above the depth
  n_layers: 1
  units: 64
  optimizer: adam
  # the range lr-find sets
  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # searched
  # below the learning rate
  batch_size: 32
baseline:
  description: "quickstart MLP"  # quoted
  params: {n_layers: 1, units: 128, dropout: 0.2, activation: relu, optimizer: adam, learning_rate: 1.0e-3, batch_size: 32}
# the end
"""

BLOCK = """\
dataset: mnist
model: mlp
space:
    n_layers: 1
    units: 64
    learning_rate:    # searched
        # bounds below
        low: 1.0e-4   # bottom
        high: 1.0e-1  # top
        log: true
    # after
    batch_size: 32
"""


def _lr(path: Path) -> dict:
    """``space.learning_rate`` as PyYAML (the study loader) reads it."""
    return yaml.safe_load(path.read_text())["space"]["learning_rate"]


def test_apply_keeps_comments_and_changes_only_the_numbers(tmp_path):
    path = tmp_path / "commented.yaml"
    path.write_text(COMMENTED)
    old, new = lrfind.apply_range(path, 2.5e-5, 2.5e-3)
    assert path.read_text() == COMMENTED.replace("{low: 1.0e-4, high: 1.0e-1, log: true}",
                                                 "{low: 2.5e-5, high: 2.5e-3, log: true}")
    assert old == ["  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # searched"]
    assert new == ["  learning_rate: {low: 2.5e-5, high: 2.5e-3, log: true}  # searched"]
    lr = _lr(path)
    assert lr == {"low": 2.5e-5, "high": 2.5e-3, "log": True}
    assert type(lr["low"]) is float and type(lr["high"]) is float
    spec = load_config(path).space["learning_rate"]
    assert (spec.low, spec.high, spec.log) == (2.5e-5, 2.5e-3, True)


def test_apply_block_style_changes_only_the_bounds(tmp_path):
    path = tmp_path / "block.yaml"
    path.write_text(BLOCK)
    old, new = lrfind.apply_range(path, 1e-5, 1e-3)  # Python spells these 1e-05: no dot
    assert path.read_text() == BLOCK.replace("low: 1.0e-4", "low: 1.0e-5").replace(
        "high: 1.0e-1", "high: 1.0e-3")  # 4-space indentation, comments and all
    assert old == ["        low: 1.0e-4   # bottom", "        high: 1.0e-1  # top"]
    assert new == ["        low: 1.0e-5   # bottom", "        high: 1.0e-3  # top"]
    lr = _lr(path)
    assert lr == {"low": 1e-5, "high": 1e-3, "log": True} and type(lr["low"]) is float


HEAD = "dataset: mnist\nmodel: mlp\n"


@pytest.mark.parametrize("text", [
    HEAD + "space: {n_layers: 1, learning_rate: {low: 1.0e-4, high: 0.1}}  # all flow\n",
    "---\n" + HEAD + "space:\n  learning_rate: {low: 1.0e-4, high: 0.1}\n",
    HEAD + "space:\n  units:\n    - 64\n    - 32\n  learning_rate: {low: 1.0e-4, high: 0.1}\n",
    HEAD + "space:\n  learning_rate:\n    low: 1.0e-4\n    high: 0.1  # wider now\n",
    HEAD + "space:\n  learning_rate: {low: 1.0e-4, high: 0.1}",  # no newline at the end
], ids=["flow-space", "doc-start", "indented-list", "block", "no-final-newline"])
def test_apply_handles_other_layouts(tmp_path, text):
    path = tmp_path / "layout.yaml"
    path.write_text(text)
    old, new = lrfind.apply_range(path, 2.5e-5, 2.5e-3)
    after = path.read_text()
    assert old and len(new) == len(old) and old != new
    assert all("2.5e-" in line for line in new)
    # Every other line is byte for byte the same, in the same order; so is the file's end.
    assert [line for line in text.splitlines() if line not in old] == \
           [line for line in after.splitlines() if line not in new]
    assert after.endswith("\n") == text.endswith("\n")
    assert "# wider now" not in text or "high: 2.5e-3 # wider now" in after  # kept beside it
    assert _lr(path) == {"low": 2.5e-5, "high": 2.5e-3}


@pytest.mark.parametrize("lr, why", [
    ("learning_rate:\n      low: 1.0e-4\n      high: 0.1\n", "'      low: 1.0e-4'"),  # 2, then 4
    ("learning_rate: {low: 1.0e-4,\n                  high: 0.1}\n", "over two lines"),
    ("learning_rate: {low: 1.0e-4,   high: 0.1}\n", "extra spaces"),
], ids=["mixed-indent", "two-line-flow", "spaced-flow"])
def test_apply_refuses_a_file_it_would_reformat(tmp_path, lr, why):
    text = HEAD + "space:\n  n_layers: 1\n  " + lr
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    cfg = load_config(path)  # a valid study file ...
    with pytest.raises(StudyFileError, match="would also rewrite .*by hand"):
        lrfind.check_appliable(cfg)  # ... refused before any training
    with pytest.raises(StudyFileError, match="by hand"):
        lrfind.apply_range(path, 1e-5, 1e-3)
    assert path.read_text() == text


def test_apply_refuses_what_it_cannot_edit_and_restores_on_failure(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(SMALL.replace("space:\n", "space: {batch_size: 32}\nx:\n"))
    with pytest.raises(StudyFileError, match="not a mapping with low: and high:.*by hand"):
        lrfind.apply_range(path, 1e-5, 1e-3)
    path.write_text(SMALL)
    with pytest.raises(StudyFileError, match="left the file as it was"):
        lrfind.apply_range(path, 1e-3, 1e-5)  # low > high: invalid, so restored
    assert path.read_text() == SMALL


def test_apply_to_every_shipped_study_changes_one_line(tmp_path):
    edited = 0
    for shipped in sorted((ROOT / "studies").glob("*.yaml")):
        spec = load_config(shipped).space.get("learning_rate")
        if not (isinstance(spec, Range) and spec.grid is None):
            continue
        path = tmp_path / shipped.name
        shutil.copy(shipped, path)
        lrfind.check_appliable(load_config(path))
        old, new = lrfind.apply_range(path, 2.5e-5, 2.5e-3)
        before, after = shipped.read_text().splitlines(), path.read_text().splitlines()
        diff = [line for line in difflib.unified_diff(before, after, n=0, lineterm="")
                if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
        assert diff == [f"-{old[0]}", f"+{new[0]}"], shipped.name
        assert new[0].startswith("  learning_rate: {low: 2.5e-5, high: 2.5e-3"), shipped.name
        edited += 1
    assert edited >= 5


def test_apply_refuses_an_uneditable_file_before_training(stores, tmp_path, monkeypatch, capsys):
    text = SMALL.replace("  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # searched\n",
                         "  learning_rate:\n      low: 1.0e-4\n      high: 0.1\n")
    folder = _studies(tmp_path, monkeypatch, small=text)
    rc = main(["lr-find", "small", "--train-subset", "1000", "--apply", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "edit the learning_rate bounds by hand" in err
    assert (folder / "small.yaml").read_text() == text
    assert not (tmp_path / "reports").exists()


# --- real range tests -------------------------------------------------------------------

def test_range_test_logs_curve_plot_and_run(stores, tmp_path, monkeypatch, capsys):
    _studies(tmp_path, monkeypatch, small=SMALL)
    rc = main(["lr-find", "small", "--train-subset", "3000", "--min-lr", "1e-5", "--max-lr", "10",
               "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "midpoint config of the space (no completed trial in storage)" in out
    with open(tmp_path / "reports" / "small" / "lr_find.csv") as fh:
        rows = list(csv.DictReader(fh))
    lrs = np.array([float(r["lr"]) for r in rows])
    assert lrs[0] == pytest.approx(1e-5)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, ratios[0], rtol=1e-4) and ratios[0] > 1  # geometric
    assert ratios[0] == pytest.approx((10 / 1e-5) ** (1 / 84), rel=1e-3)  # 2700 images / 32
    client, run = _lr_find_run("small")
    m, p = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and run.info.run_name == "lr-find"
    # Stopped early once the smoothed loss passed 4× its minimum, or swept the whole range.
    assert len(rows) < 85 if p["lr_find.diverged"] == "True" else lrs[-1] == pytest.approx(10)
    assert 1e-5 <= m["suggested_lr_min"] < m["suggested_lr_max"] <= 10
    smoothed = np.array([float(r["smoothed_loss"]) for r in rows])
    i_min = int(np.argmin(smoothed))
    assert lrs[i_min] == pytest.approx(m["lr_min_loss"], rel=1e-4)
    assert smoothed[-1] > smoothed[i_min] * 1.2  # the loss turned up: diverging past lr_min_loss
    assert m["suggested_lr_max"] <= m["lr_min_loss"] / 10 * 1.05  # a decade below that
    assert p["optimizer"] == "adam" and p["lr_schedule"] == "none" and "learning_rate" not in p
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"lr_find.png",
                                                                       "lr_find.csv"}
    assert (tmp_path / "reports" / "small" / "lr_find.png").stat().st_size > 10_000
    assert f"[{m['suggested_lr_min']:.1e}, {m['suggested_lr_max']:.1e}]" in out
    assert "apply it: mnist-opt lr-find small --apply" in out
    assert (tmp_path / "my_studies" / "small.yaml").read_text() == SMALL  # no --apply: unchanged


def test_apply_to_a_study_with_trials(stores, tmp_path, monkeypatch, capsys):
    folder = _studies(tmp_path, monkeypatch)
    shutil.copy(ROOT / "studies" / "mlp_tpe.yaml", folder)
    before = (folder / "mlp_tpe.yaml").read_text()
    cfg = load_config(folder / "mlp_tpe.yaml")
    study = optuna.create_study(study_name="mlp_tpe", storage=stores["storage"],
                                direction="maximize")
    study.enqueue_trial({"n_layers": 1, "units_l0": 128, "dropout_l0": 0.0, "batch_norm": False,
                         "activation": "relu", "optimizer": "adam", "learning_rate": 1e-3,
                         "batch_size": 128, "lr_schedule": "exponential", "lr_decay": 0.9})
    trial = study.ask()
    suggest_params(trial, cfg)
    study.tell(trial, 0.95)

    rc = main(["lr-find", "mlp_tpe", "--train-subset", "12000", "--apply", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "adam, config of best trial 0" in out and "already has 1 trial in" in out
    after = (folder / "mlp_tpe.yaml").read_text()
    diff = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0,
                                                  lineterm="")
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    assert [d[:17] for d in diff] == ["-  learning_rate:", "+  learning_rate:"]
    _, run = _lr_find_run("mlp_tpe")
    low, high = run.data.metrics["suggested_lr_min"], run.data.metrics["suggested_lr_max"]
    assert diff[-1] == f"+  learning_rate: {{low: {lrfind.yaml_float(low)}, " \
                       f"high: {lrfind.yaml_float(high)}, log: true}}"
    assert diff[-1] in out.replace("\n+ ", "\n+")  # the new line is shown
    spec = load_config(folder / "mlp_tpe.yaml").space["learning_rate"]
    assert isinstance(spec, Range) and (spec.low, spec.high, spec.log) == (low, high, True)
    assert run.data.tags["source_trial"] == "0" and run.data.params["units_l0"] == "128"
    assert run.data.params["lr_schedule"] == "none"  # the trial's decay is off for the test


ONE_CYCLE_KEYS = {"warmup_fraction", "div_factor", "final_div", "momentum_high", "momentum_low"}


def test_apply_to_a_one_cycle_study_tests_without_the_cycle_and_sets_the_peak_range(
        stores, tmp_path, monkeypatch, capsys):
    """mlp_onecycle (lr_schedule: one_cycle, learning_rate is the cycle's peak): the range test
    runs the best trial's config at constant learning rates, without the cycle's parameters,
    and --apply rewrites the learning_rate range, i.e. the peak's."""
    folder = _studies(tmp_path, monkeypatch)
    shutil.copy(ROOT / "studies" / "mlp_onecycle.yaml", folder)
    before = (folder / "mlp_onecycle.yaml").read_text()
    cfg = load_config(folder / "mlp_onecycle.yaml")
    study = optuna.create_study(study_name="mlp_onecycle", storage=stores["storage"],
                                direction="maximize")
    study.enqueue_trial({"n_layers": 1, "units_l0": 128, "dropout_l0": 0.0, "batch_norm": False,
                         "activation": "relu", "optimizer": "adam", "learning_rate": 1e-3,
                         "batch_size": 128})
    trial = study.ask()
    trained = suggest_params(trial, cfg)
    study.tell(trial, 0.95)
    assert trained["lr_schedule"] == "one_cycle" and ONE_CYCLE_KEYS <= set(trained)
    params, _, number = lrfind.tested_params(cfg, study)
    assert number == 0 and params["lr_schedule"] == "none" and not ONE_CYCLE_KEYS & set(params)
    assert params == {**{k: v for k, v in trained.items() if k not in ONE_CYCLE_KEYS},
                      "lr_schedule": "none"}  # everything else is the trial's

    rc = main(["lr-find", "mlp_onecycle", "--train-subset", "12000", "--apply", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "adam, config of best trial 0" in out
    _, run = _lr_find_run("mlp_onecycle")
    assert run.data.params["lr_schedule"] == "none" and not ONE_CYCLE_KEYS & set(run.data.params)
    after = (folder / "mlp_onecycle.yaml").read_text()
    diff = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0,
                                                  lineterm="")
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    low, high = run.data.metrics["suggested_lr_min"], run.data.metrics["suggested_lr_max"]
    assert diff == ["-  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}",
                    f"+  learning_rate: {{low: {lrfind.yaml_float(low)}, "
                    f"high: {lrfind.yaml_float(high)}, log: true}}"]
    again = load_config(folder / "mlp_onecycle.yaml")
    assert again.space["lr_schedule"] == "one_cycle"  # still a one-cycle study, new peak range
    spec = again.space["learning_rate"]
    assert isinstance(spec, Range) and (spec.low, spec.high, spec.log) == (low, high, True)


@pytest.mark.parametrize("space, what", [("learning_rate: 3.0e-3", "fixed at 0.003"),
                                         ("learning_rate: {choices: [1.0e-3, 1.0e-2]}", "choices"),
                                         ("activation: relu", "not searched")])
def test_apply_refuses_a_learning_rate_that_is_not_a_range(stores, tmp_path, monkeypatch, capsys,
                                                           space, what):
    text = SMALL.replace("learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}  # searched", space)
    folder = _studies(tmp_path, monkeypatch, small=text)
    rc = main(["lr-find", "small", "--train-subset", "1000", "--apply", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("mnist-opt: error: ")
    assert "space.learning_rate is" in err and what in err and "without --apply" in err
    assert (folder / "small.yaml").read_text() == text
    assert not (tmp_path / "reports").exists()  # refused before any training


def test_the_range_test_trains_a_label_smoothing_model_on_one_hot_targets():
    """lr-find on a study with label smoothing (the one-cycle recipes): the model compiled with
    CategoricalCrossentropy gets one-hot labels, and the curve has a finite loss per batch."""
    from mnist_opt import data

    split = data.split(data.load("mnist"), 0.2, 1, 600)
    params = {"n_layers": 1, "units_l0": 16, "dropout_l0": 0.0, "batch_norm": False,
              "activation": "relu", "optimizer": "adam", "learning_rate": 1e-3,
              "batch_size": 32, "lr_schedule": "none", "label_smoothing": 0.1}
    curve = lrfind.range_test(params, split.x_train, split.y_train, 1e-5, 1e-1, 12, seed=0)
    assert len(curve.losses) == 12 and all(np.isfinite(curve.losses))
