"""End to end: a real 3-trial study on 3,000 MNIST images, then retrain, against real stores."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_opt import data
from mnist_opt.reporting import results
from mnist_opt.study.config import find_study, with_overrides
from mnist_opt.reporting.plots import PLOTS
from mnist_opt.training.retrain import retrain
from mnist_opt.search.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
slow = pytest.mark.slow  # not in `make test-fast`

N_TRIALS, EPOCHS, SUBSET = 3, 2, 3000


def _startup(cfg, n: int):
    """``cfg`` with ``n_startup_trials=n``: the trials after the first ``n`` are the
    model-based sampler's, not its random start-up's."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_startup_trials": n})})


def _relative_params(trial: optuna.trial.FrozenTrial, key: str) -> dict:
    """The params a sampler's ``sample_relative`` proposed for ``trial``: TPE (multivariate)
    and GP share them with other workers in the trial's system attrs as ``<key>:0``, ``:1``…"""
    chunks = []
    while f"{key}:{len(chunks)}" in trial.system_attrs:
        chunks.append(trial.system_attrs[f"{key}:{len(chunks)}"])
    return json.loads("".join(chunks)) if chunks else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """Run `mlp_tpe` (3 trials × 2 epochs) and retrain it once; the tests below inspect the stores."""
    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        (tmp / "mlruns").mkdir()
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        storage = f"sqlite:///{tmp / 'optuna.db'}"
        cfg = with_overrides(find_study("mlp_tpe", ROOT / "studies"), n_trials=N_TRIALS,
                             max_epochs=EPOCHS, train_subset=SUBSET)
        study = run_study(cfg, storage, verbose=False, progress=False)
        result = retrain(cfg, storage, verbose=False)
        yield {"cfg": cfg, "study": study, "storage": storage, "retrain": result,
               "client": MlflowClient(), "tmp": tmp}


def _runs(client: MlflowClient, name: str, kind: str):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], f"tags.`mnist_opt.kind` = '{kind}'")


@slow
def test_trials_are_in_storage_with_states(finished):
    study = optuna.load_study(study_name="mlp_tpe", storage=finished["storage"])
    assert len(study.trials) == N_TRIALS
    assert [t.number for t in study.trials] == list(range(N_TRIALS))
    finished_states = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all(t.state in finished_states for t in study.trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(t.user_attrs.get("mlflow_run_id") for t in study.trials)


@slow
def test_one_parent_run_and_one_nested_run_per_trial(finished):
    client = finished["client"]
    parents = _runs(client, "mlp_tpe", "study")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset"] == "mnist" and parent.data.params["search.sampler"] == "tpe"
    assert parent.data.params["n_train"] == str(int(SUBSET * 0.9))
    trials = _runs(client, "mlp_tpe", "trial")
    assert len(trials) == N_TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    study = finished["study"]
    assert {r.info.run_id for r in trials} == {t.user_attrs["mlflow_run_id"] for t in study.trials}


@slow
def test_nested_runs_hold_params_curves_state_and_models(finished):
    client = finished["client"]
    for trial in finished["study"].trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["trial_number"] == str(trial.number)
        for key, value in trial.params.items():
            assert run.data.params[key] == str(value)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
        assert [m.value for m in history] == pytest.approx(
            [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)])
        for key in ("loss", "accuracy", "val_loss"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(history)
        # the epoch log (time to target): one entry per epoch, in time order, same accuracy
        log = trial.user_attrs["epoch_log"]
        assert [acc for _, acc in log] == pytest.approx([m.value for m in history])
        assert [t for t, _ in log] == sorted(t for t, _ in log)
        assert trial.datetime_start.timestamp() <= log[0][0] <= trial.datetime_complete.timestamp()
        assert run.data.metrics["duration_s"] > 0
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.data.tags["state"] == "complete" and run.info.status == "FINISHED"
            model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
            probs = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
            assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
        else:
            assert run.data.tags["state"] == "pruned" and run.info.status == "KILLED"


@slow
def test_retrain_logs_test_accuracy_and_registers_a_model(finished):
    res, client = finished["retrain"], finished["client"]
    study = finished["study"]
    assert res.trial_number == study.best_trial.number
    run = client.get_run(res.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(res.test_accuracy)
    assert 0.5 < res.test_accuracy <= 1.0  # 2 epochs on 3,000 images: well above chance (0.1)
    assert run.data.tags["source_trial"] == str(study.best_trial.number)
    versions = [v for v in client.search_model_versions("name = 'mlp_tpe'")
                if v.run_id == res.run_id]  # the seeds test below registers version 2
    assert [str(v.version) for v in versions] == [res.model_version] == ["1"]
    ds = data.load("mnist")
    x = data.to_float(ds.x_test[:200])
    model = mlflow.pyfunc.load_model(f"models:/mlp_tpe/{res.model_version}")
    probs = np.asarray(model.predict(x))
    assert probs.shape == (200, 10)
    assert (probs.argmax(axis=1) == ds.y_test[:200]).mean() > 0.5


@slow
def test_retrain_logs_evaluation_pictures_and_the_baseline(finished):
    """Confusion matrix, per-class report and misclassified grid as artifacts, and the study
    file's baseline trained on the same images as a nested run, its accuracy beside ours."""
    res, client = finished["retrain"], finished["client"]
    run = client.get_run(res.run_id)
    names = {Path(a.path).name for a in client.list_artifacts(res.run_id, "evaluation")}
    assert {"confusion_matrix.png", "misclassified.png", "classification_report.json",
            "classification_report.txt", "confusion_matrix.json", "pr_curves.png",
            "roc_curves.png", "pr_roc.json"} <= names
    folder = Path(mlflow.artifacts.download_artifacts(run_id=res.run_id, artifact_path="evaluation",
                                                      dst_path=str(finished["tmp"] / "dl")))
    cm = np.array(json.loads((folder / "confusion_matrix.json").read_text())["rows_true_cols_predicted"])
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert cm.sum(axis=1).tolist() == np.bincount(data.load("mnist").y_test).tolist()
    assert np.trace(cm) / cm.sum() == pytest.approx(res.test_accuracy, abs=2e-4)
    assert run.data.metrics["test_errors"] == cm.sum() - np.trace(cm)
    ranking = json.loads((folder / "pr_roc.json").read_text())["macro avg"]
    assert run.data.metrics["test_macro_ap"] == pytest.approx(ranking["average_precision"])
    assert run.data.metrics["test_macro_auc"] == pytest.approx(ranking["roc_auc"])
    assert run.data.tags["lowest_ap_class"] in [str(i) for i in range(10)]
    report = json.loads((folder / "classification_report.json").read_text())
    assert [k for k in report if k.isdigit()] == [str(i) for i in range(10)]
    assert run.data.metrics["test_macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    for png in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(folder / png) as im:
            assert im.format == "PNG" and min(im.size) > 300
    baseline = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res.run_id}' and "
                                  "tags.`mnist_opt.kind` = 'retrain-baseline'")
    assert len(baseline) == 1 and baseline[0].data.params["units_l0"] == "128"
    base_acc = baseline[0].data.metrics["test_accuracy"]
    assert res.baseline_accuracy == pytest.approx(base_acc) and 0.5 < base_acc <= 1
    assert run.data.metrics["gain_over_baseline"] == pytest.approx(res.test_accuracy - base_acc)


@slow
def test_retrain_with_seeds_reports_mean_and_std_of_nested_runs(finished):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(finished["tmp"])
        res = retrain(finished["cfg"], finished["storage"], verbose=False, seeds=2)
        mp.setenv("MNIST_OPT_STUDIES", str(ROOT / "studies"))
        row = results.collect(["mlp_tpe"])[0]
    client = finished["client"]
    parent = client.get_run(res.run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res.run_id}' and "
                                  "tags.`mnist_opt.kind` = 'retrain-seed'")
    assert sorted(r.data.tags["seed"] for r in children) == ["48", "49"]
    accs = sorted(r.data.metrics["test_accuracy"] for r in children)
    assert sorted(res.test_accuracies) == pytest.approx(accs)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(np.mean(accs))
    assert parent.data.metrics["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert parent.data.params["seeds"] == "2" and res.model_version == "2"
    # @champion: the version with the higher mean test accuracy (a tie goes to the newer)
    first = float(client.get_model_version("mlp_tpe", "1").tags["test_accuracy"])
    assert res.champion == ("1" if first > res.test_accuracy else "2")
    assert str(client.get_model_version_by_alias("mlp_tpe", "champion").version) == res.champion
    # the table reads back this latest retrain, and the README update keeps the text around it
    assert row["seeds"] == 2 and row["test"] == pytest.approx(res.test_accuracy)
    assert row["complete"] + row["pruned"] == N_TRIALS
    readme = finished["tmp"] / "README.md"
    readme.write_text(f"intro\n{results.START}\nold\n{results.END}\noutro\n")
    results.update_file(readme, results.markdown([row]))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert f"{res.test_accuracy:.2%} ± {res.test_std:.2%}" in text and "| mlp_tpe |" in text


@slow
def test_rerun_continues_the_study_to_its_target(finished, capsys):
    """n_trials is the study's target: the same target does nothing, a higher one adds trials."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(finished["tmp"])
        same = run_study(finished["cfg"], finished["storage"], verbose=False, progress=False)
        assert len(same.trials) == N_TRIALS
        assert "nothing to run" in capsys.readouterr().out
        assert len(_runs(finished["client"], "mlp_tpe", "study")) == 1
        cfg = with_overrides(finished["cfg"], n_trials=N_TRIALS + 1)
        study = run_study(cfg, finished["storage"], verbose=False, progress=False)
    assert len(study.trials) == N_TRIALS + 1
    assert len(_runs(finished["client"], "mlp_tpe", "study")) == 2


@slow
def test_cnn_study_with_gp_sampler(stores, random_proposals):
    """One random start-up trial, then a trial the Gaussian process proposes."""
    cfg = _startup(with_overrides(find_study("cnn_gp"), n_trials=2, max_epochs=1,
                                  train_subset=1000), 1)
    study = run_study(cfg, stores["storage"], verbose=False, progress=False)
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    trials = study.trials
    assert len(trials) == 2
    states = [t.state for t in trials]  # Hyperband may prune the second at epoch 1
    # the GP fits COMPLETE trials only: without one, trial 1 would be random again
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all({"convs_per_block", "augment"} <= set(t.params) for t in trials)
    assert all(t.user_attrs["n_params"] > 0 for t in trials)
    random = random_proposals(cfg, 2)
    assert trials[0].params == random[0]  # the start-up trial: the seeded random sampler's
    # trial 1 is the GP's: every parameter came from its sample_relative (GP's own record),
    # and not what the random start-up sampler would have drawn next
    gp = _relative_params(trials[1], "gp:relative_params")
    assert gp and set(gp) == set(trials[1].params)
    assert all(trials[1].params[k] == pytest.approx(v) for k, v in gp.items())
    assert trials[1].params != random[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_opt", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@slow
def test_cli_study_then_retrain(stores, tmp_path):
    quick = ["--n-trials", "2", "--max-epochs", "1", "--train-subset", "1000"]
    proc = _cli("study", "fashion_mlp_tpe", *quick, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary line reports what the storage holds: 2 finished trials, none failed
    found = re.search(r"study fashion_mlp_tpe: (\d+) complete, (\d+) pruned, (\d+) failed trials "
                      r"in storage \(target: 2 finished\)", proc.stdout)
    assert found, proc.stdout[-3000:]
    complete, pruned, failed = map(int, found.groups())
    assert complete + pruned == 2 and complete >= 1 and failed == 0
    study = optuna.load_study(study_name="fashion_mlp_tpe", storage=stores["storage"])
    states = [t.state for t in study.trials]
    assert (states.count(optuna.trial.TrialState.COMPLETE),
            states.count(optuna.trial.TrialState.PRUNED), len(states)) == (complete, pruned, 2)
    proc = _cli("retrain", "fashion_mlp_tpe", *quick, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy 0." in proc.stdout and "best validation accuracy 0." in proc.stdout
    # the evaluation on disk too, not only in MLflow: pictures and the numbers behind them
    folder = tmp_path / "reports" / "fashion_mlp_tpe" / "evaluation"
    assert {p.name for p in folder.iterdir()} == {
        "confusion_matrix.png", "misclassified.png", "pr_curves.png", "roc_curves.png",
        "classification_report.json", "classification_report.txt", "confusion_matrix.json",
        "pr_roc.json"}
    for png in ("confusion_matrix.png", "misclassified.png", "pr_curves.png", "roc_curves.png"):
        with Image.open(folder / png) as im:
            assert im.format == "PNG" and min(im.size) > 300, png
    assert "in reports/fashion_mlp_tpe/evaluation/ and the MLflow run's evaluation/" in proc.stdout
    # the line names the class with the lowest average precision, as pr_roc.json has it
    scores = json.loads((folder / "pr_roc.json").read_text())
    ap = {name: v["average_precision"] for name, v in scores.items() if name != "macro avg"}
    assert len(ap) == 10 and "T-shirt/top" in ap  # Fashion-MNIST's class names
    lowest = min(ap, key=ap.get)
    assert (f"macro AP {scores['macro avg']['average_precision']:.4f}, " in proc.stdout and
            f"lowest AP class {lowest} (AP {ap[lowest]:.4f})" in proc.stdout), proc.stdout


@slow  # no training, but `mnist-opt study/retrain` loads TensorFlow first: 5-10 s
def test_cli_unknown_study_lists_known_ones(stores, tmp_path):
    proc = _cli("study", "mlp_tpee", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown study 'mlp_tpee'" in proc.stderr and "mlp_tpe" in proc.stderr
    assert "cnn_gp" in proc.stderr and "Traceback" not in proc.stderr


@slow  # no training, but `mnist-opt study/retrain` loads TensorFlow first: 5-10 s
def test_cli_invalid_study_file_names_file_field_and_allowed_values(stores, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "studies" / "mlp_tpe.yaml").read_text().replace("sampler: tpe",
                                                                          "sampler: bayes"))
    proc = _cli("study", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "search.sampler" in proc.stderr and "'tpe'" in proc.stderr
    assert "Traceback" not in proc.stderr


@slow  # no training, but `mnist-opt study/retrain` loads TensorFlow first: 5-10 s
def test_cli_retrain_without_a_study_says_what_to_run(stores, tmp_path):
    proc = _cli("retrain", "mlp_random", cwd=tmp_path)
    assert proc.returncode == 2
    assert "mnist-opt study mlp_random" in proc.stderr


def test_cli_list_shows_every_shipped_study(stores, tmp_path):
    proc = _cli("list", cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("mlp_tpe", "mlp_hyperband", "mlp_random", "cnn_gp", "fashion_mlp_tpe",
                 "fashion_cnn_tpe"):
        assert name in proc.stdout


@slow
def test_same_study_file_and_seed_give_the_same_split_and_params(tmp_path, monkeypatch,
                                                                 random_proposals):
    """Sequential runs with one seed: identical sampled params, those of TPE's model past its
    one start-up trial; seed and versions logged."""
    cfg = _startup(with_overrides(find_study("mlp_tpe", ROOT / "studies"), n_trials=3,
                                  max_epochs=1, train_subset=1000), 1)
    random = random_proposals(cfg, 3)
    sequences = []
    for i in range(2):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / f'mlflow{i}.db'}")
        study = run_study(cfg, f"sqlite:///{tmp_path / f'optuna{i}.db'}", verbose=False,
                          progress=False)
        sequences.append([t.params for t in study.trials])
        trials = study.trials
        assert trials[0].params == random[0]  # start-up: the seeded random sampler's
        for t in trials[1:]:  # then TPE's: its multivariate proposal is recorded in the trial,
            tpe = _relative_params(t, "tpe:relative_params")  # and differs from random's
            assert tpe and all(t.params[k] == pytest.approx(v) for k, v in tpe.items())
            assert t.params != random[t.number]
        parent = MlflowClient().get_run(study.user_attrs["last_mlflow_parent_run_id"])
        assert parent.data.params["search.seed"] == "48"
        assert parent.data.params["data.seed"] == "48"
        for pkg in ("tensorflow", "keras", "optuna", "mlflow", "numpy", "python"):
            assert parent.data.params[f"version.{pkg}"]
    assert sequences[0] == sequences[1] and len(sequences[0]) == 3


@slow
def test_study_run_holds_optuna_plots_as_html_and_png(finished):
    client = finished["client"]
    parent = _runs(client, "mlp_tpe", "study")[-1]  # the fixture's own invocation
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    skipped = parent.data.tags.get("plots_skipped", "")
    for plot in PLOTS:
        if plot == "param_importances" and plot in skipped:
            continue  # needs two completed trials; 3 short trials may have fewer
        assert {f"plots/{plot}.html", f"plots/{plot}.png"} <= names, (plot, skipped)


@slow
def test_report_prints_the_top_trials_and_writes_plots(finished, tmp_path):
    proc = _cli("report", "mlp_tpe", "--storage", finished["storage"], "--top", "2",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "state", "value", "epochs"]
    study = optuna.load_study(study_name="mlp_tpe", storage=finished["storage"])  # the rerun
    best = study.best_trial                                                  # test adds one
    # ">" marks the trial retrain would pick
    assert lines[1].split()[:4] == [">", str(best.number), "COMPLETE", f"{best.value:.4f}"]
    assert f"{len(study.trials)} trials:" in proc.stdout
    folder = tmp_path / "reports" / "mlp_tpe"
    png = folder / "optimization_history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in (folder / "intermediate_values.html").read_text()
    assert (folder / "plotly.min.js").exists()  # the HTML works offline


def test_report_of_an_unknown_study_says_what_to_run(stores, tmp_path):
    proc = _cli("report", "mlp_random", cwd=tmp_path)
    assert proc.returncode == 2 and "mnist-opt study mlp_random" in proc.stderr
