"""Retrain the best trial on train+validation, evaluate it on the held-out test set, register it."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import optuna

from mnist_opt import data
from mnist_opt.study import objectives
from mnist_opt.tracking import runs as tracking
from mnist_opt.training import evaluation
from mnist_opt.training.callbacks import TrialCallback
from mnist_opt.study.config import StudyConfig
from mnist_opt.errors import RetrainError
from mnist_opt.study.space import baseline_params, suggest_params
from mnist_opt.tracking.storage import load_existing, resolve_storage
from mnist_opt.training.loop import evaluate, fresh_model, train


@dataclass
class RetrainResult:
    trial_number: int
    val_accuracy: float
    test_accuracy: float  # the mean over seeds
    test_loss: float
    run_id: str
    model_uri: str
    model_version: str | None
    test_accuracies: list[float] = field(default_factory=list)  # one per seed
    evaluation: dict = field(default_factory=dict)  # macro F1, AP, AUC, errors, weakest classes
    report_dir: Path | None = None
    baseline_accuracy: float | None = None
    champion: str | None = None  # the registered version that holds @champion after this one

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test_accuracies) if len(self.test_accuracies) > 1 else 0.0


def best_trial(cfg: StudyConfig, storage: str | optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial ``retrain`` takes (``objectives.pick``) of the study in ``storage``, or of
    ``study`` itself when given one."""
    study = storage if isinstance(storage, optuna.Study) else load_existing(cfg.name, storage)
    if cfg.search.promote and study.user_attrs.get(objectives.PROMOTED_BEST) is None:
        print(f"note: {cfg.name} has no promoted pick (search.promote had not finished, or "
              f"new trials came since): taking the search's best; run `mnist-opt study "
              f"{cfg.name}` to promote first")
    try:
        return objectives.pick(study, cfg.search.pick_tolerance)
    except ValueError:
        raise RetrainError(f"study {cfg.name!r} has no completed trial yet; run more trials "
                           f"with `mnist-opt study {cfg.name}`") from None


def _training_images(cfg: StudyConfig, ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """What a retrain trains on: all training images (train + validation), or the study's
    ``train_subset`` of them."""
    x, y = data.stratified_subset(ds.x_train, ds.y_train, cfg.data.train_subset, cfg.data.seed)
    return data.to_float(x), y.astype("int64")


def score_on_test(cfg: StudyConfig, trial_params: dict, seed: int) -> float:
    """``retrain``'s recipe for one configuration, logging nothing: the searched ``params``
    of a trial (any tool's) trained on all training images for ``retrain_epochs``, with
    ``seed``, then the test set's accuracy (``compare --retrain``)."""
    params = suggest_params(optuna.trial.FixedTrial(trial_params), cfg)
    ds = data.load(cfg.dataset)
    _, scores = _train_and_test(params, _training_images(cfg, ds), ds, cfg.retrain_epochs, seed,
                                "retrain", verbose=False)
    return scores["accuracy"]


def _train_and_test(params: dict, train_xy: tuple[np.ndarray, np.ndarray], ds: data.Dataset,
                    epochs: int, seed: int, label: str, verbose: bool):
    """One seeded training on all training images, then the test set."""
    model = fresh_model(params, seed)
    callback = TrialCallback(None, epochs=epochs, label=label, verbose=verbose)
    train(model, params, train_xy, None, epochs, [callback], seed=seed)
    return model, evaluate(model, data.to_float(ds.x_test), ds.y_test.astype("int64"))


def retrain(cfg: StudyConfig, storage: str | None = None, verbose: bool = True,
            seeds: int = 1) -> RetrainResult:
    """Rebuild the best trial's model from its params and train it on all training images.

    With ``seeds`` > 1 the same configuration is trained once per seed (each a nested MLflow
    run) and the parent run gets the mean and standard deviation, so a result is not one lucky
    initialisation. The first seed's model is the one registered. Search never saw the test
    set; this is the one place that reads it.
    """
    storage = resolve_storage(storage)
    study = load_existing(cfg.name, storage)
    best = best_trial(cfg, study)
    val_accuracy = float(best.user_attrs.get("val_accuracy", best.values[0]))
    promoted = study.user_attrs.get(objectives.PROMOTED, {})
    if str(best.number) in promoted:  # its full-data validation accuracy, not the subset's
        val_accuracy = float(promoted[str(best.number)]["val_accuracy"])
    params = suggest_params(optuna.trial.FixedTrial(best.params), cfg)
    ds = data.load(cfg.dataset)
    train_xy = _training_images(cfg, ds)
    y = train_xy[1]
    exp = tracking.open_experiment(cfg.name)
    tags = {"mnist_opt.kind": "retrain", "source_trial": str(best.number),
            "source_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "optuna.study_name": cfg.name, "optuna.storage": storage}
    if cfg.search.second_objective:  # which trial of the Pareto front, and why
        tags["pick_rule"] = objectives.rule(cfg.search.metric, cfg.search.second_objective,
                                            cfg.search.pick_tolerance)
        tags[f"source_{cfg.search.second_objective}"] = f"{best.values[1]:.6g}"
    epochs = cfg.retrain_epochs
    all_seeds = [cfg.search.seed + i for i in range(seeds)]
    with mlflow.start_run(experiment_id=exp, run_name=f"retrain-trial-{best.number}", tags=tags) as run:
        mlflow.log_params({**params, "epochs": epochs, "n_train": len(y), "seeds": seeds})
        results, info = [], None
        for seed in all_seeds:
            # one seed logs to the retrain run itself; several get a nested run each
            nested = seeds > 1
            with (mlflow.start_run(experiment_id=exp, run_name=f"seed-{seed}", nested=True,
                                   tags={"mnist_opt.kind": "retrain-seed", "seed": str(seed)})
                  if nested else contextlib.nullcontext()):
                model, scores = _train_and_test(params, train_xy, ds, epochs, seed,
                                                f"seed {seed}" if nested else "retrain", verbose)
                if nested:
                    mlflow.log_metrics({"test_loss": scores["loss"],
                                        "test_accuracy": scores["accuracy"]})
            results.append(scores)
            if info is None:  # register the first seed's model, chosen before any test score
                info = tracking.log_model(model, registered_name=cfg.name)
                folder = cfg.report_dir / "evaluation"
                summary = _log_evaluation(model, ds, folder,
                                          f"{cfg.name} trial {best.number}, seed {seed}")
            del model
        accs = [r["accuracy"] for r in results]
        result = RetrainResult(best.number, val_accuracy, statistics.fmean(accs),
                               statistics.fmean(r["loss"] for r in results), run.info.run_id,
                               info.model_uri, str(info.registered_model_version)
                               if info.registered_model_version else None, accs, summary, folder)
        mlflow.log_metrics({"test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
                            "test_accuracy_std": result.test_std, "best_val_accuracy": val_accuracy})
        if result.model_version:  # @champion: the best retrained version by test accuracy
            result.champion = tracking.crown(cfg.name, result.model_version, result.test_accuracy)
        if cfg.baseline is not None:
            result.baseline_accuracy = _baseline(cfg, train_xy, ds, exp, all_seeds[0], verbose)
            mlflow.log_metrics({"baseline_test_accuracy": result.baseline_accuracy,
                                "gain_over_baseline": result.test_accuracy - result.baseline_accuracy})
    return result


def _log_evaluation(model, ds: data.Dataset, folder: Path, title: str) -> dict:
    """Confusion matrix, per-class report, misclassified grid and PR/ROC curves: to ``folder``
    and MLflow (the whole folder under ``evaluation/``; the numbers, ``test_macro_ap`` and
    ``test_macro_auc`` among them, as metrics; the class names as tags)."""
    x_test = data.to_float(ds.x_test)
    ev = evaluation.Evaluation(ds.y_test.astype("int64"), evaluation.predict_probs(model, x_test),
                               ds.class_names)
    summary = evaluation.write_evaluation(ev, x_test, folder, title)
    mlflow.log_artifacts(str(folder), "evaluation")
    mlflow.log_metrics({k: v for k, v in summary.items() if not isinstance(v, str)})
    mlflow.set_tags({k: summary[k] for k in ("weakest_class", "lowest_ap_class")})
    return summary


def _baseline(cfg: StudyConfig, train_xy: tuple[np.ndarray, np.ndarray], ds: data.Dataset,
              exp: str, seed: int, verbose: bool) -> float:
    """Train the study file's baseline on the same images (one seed) and test it, as a nested run."""
    params = baseline_params(cfg)
    epochs = cfg.baseline.epochs or cfg.retrain_epochs
    with mlflow.start_run(experiment_id=exp, run_name="baseline", nested=True,
                          tags={"mnist_opt.kind": "retrain-baseline", "seed": str(seed)},
                          description=cfg.baseline.description):
        mlflow.log_params({**params, "epochs": epochs, "description": cfg.baseline.description})
        model, scores = _train_and_test(params, train_xy, ds, epochs, seed, "baseline", verbose)
        mlflow.log_metrics({"test_loss": scores["loss"], "test_accuracy": scores["accuracy"]})
        del model
    return scores["accuracy"]
