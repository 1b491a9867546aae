"""The study runner: Optuna storage, sampler and pruner from the study file, and the objective."""
from __future__ import annotations

import math
import os
import time
from typing import Any

import keras
import mlflow
import optuna

from mnist_opt import data, tracking
from mnist_opt.callbacks import TrialCallback
from mnist_opt.config import StudyConfig, studies_dir
from mnist_opt.models import build_model
from mnist_opt.space import grid_space, suggest_params
from mnist_opt.training import train


def default_storage() -> str:
    """One SQLite file under ``studies/`` holds every study (git-ignored)."""
    return f"sqlite:///{studies_dir() / 'optuna.db'}"


def resolve_storage(storage: str | None = None) -> str:
    return storage or os.environ.get("OPTUNA_STORAGE") or default_storage()


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=s.seed, scramble=True)
    return optuna.samplers.GridSampler(grid_space(cfg), seed=s.seed)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "hyperband":
        # max_resource is the epoch budget: "auto" would prune nothing until a trial completes.
        return optuna.pruners.HyperbandPruner(
            min_resource=s.min_resource, max_resource=cfg.training.max_epochs,
            reduction_factor=s.reduction_factor)
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.n_startup_trials // 2 or 1,
                                           n_warmup_steps=s.n_warmup_steps)
    return optuna.pruners.NopPruner()


def hyperband_brackets(cfg: StudyConfig) -> int:
    s = cfg.search
    return int(math.floor(math.log(cfg.training.max_epochs / s.min_resource, s.reduction_factor))) + 1


def open_study(cfg: StudyConfig, storage: str) -> optuna.Study:
    """Create the study, or continue it (``load_if_exists``); warn when the study file changed."""
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, sampler=make_sampler(cfg), pruner=make_pruner(cfg),
        direction=cfg.search.direction, load_if_exists=True)
    old = study.user_attrs.get("config_digest")
    if old and old != cfg.digest:
        optuna.logging.get_logger("mnist_opt").warning(
            "study file %s changed since this study began (digest %s → %s); trials of both "
            "versions are mixed in one study", cfg.path, old, cfg.digest)
    for key, value in {"config_digest": cfg.digest, "dataset": cfg.dataset, "model": cfg.model,
                       "metric": cfg.search.metric}.items():
        study.set_user_attr(key, value)
    return study


def make_objective(cfg: StudyConfig, split: data.Split, verbose: bool = True):
    """``objective(trial)``: suggest, build, train with the reporting callback, log the model."""

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, cfg)
        with tracking.trial_run(trial, params):
            keras.backend.clear_session()  # fresh graph and names: memory stays flat across trials
            keras.utils.set_random_seed(cfg.search.seed + trial.number)
            model = build_model(params)
            trial.set_user_attr("n_params", model.count_params())
            mlflow.log_param("n_params", model.count_params())
            callback = TrialCallback(trial, cfg.search.metric, cfg.training.max_epochs,
                                     label=f"trial {trial.number}", verbose=verbose)
            history = train(model, params, (split.x_train, split.y_train),
                            (split.x_val, split.y_val), cfg.training.max_epochs, [callback],
                            seed=cfg.search.seed + trial.number)
            tracking.log_model(model)
            trial.set_user_attr("val_accuracy", float(history.history["val_accuracy"][-1]))
            return float(history.history[cfg.search.metric][-1])

    return objective


def summary(study: optuna.Study) -> dict[str, Any]:
    states = [t.state.name.lower() for t in study.trials]
    out: dict[str, Any] = {s: states.count(s) for s in ("complete", "pruned", "fail")}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        out.update(best_trial=study.best_trial.number, best_value=study.best_value,
                   best_params=study.best_params)
    return out


def run_study(cfg: StudyConfig, storage: str | None = None, verbose: bool = True,
              progress: bool = True) -> optuna.Study:
    """Run ``cfg.search.n_trials`` more trials of the study under one MLflow parent run."""
    storage = resolve_storage(storage)
    ds = data.load(cfg.dataset)
    split = data.split(ds, cfg.data.val_fraction, cfg.data.seed, cfg.data.train_subset)
    tracking.configure()
    study = open_study(cfg, storage)
    extra = {"n_train": len(split.y_train), "n_val": len(split.y_val),
             "sampler_class": type(study.sampler).__name__,
             "pruner_class": type(study.pruner).__name__}
    if cfg.search.pruner == "hyperband":
        extra["hyperband_brackets"] = hyperband_brackets(cfg)
    start = time.monotonic()
    with tracking.study_run(cfg, storage, extra) as parent:
        study.set_user_attr("last_mlflow_parent_run_id", parent.info.run_id)
        study.optimize(make_objective(cfg, split, verbose), n_trials=cfg.search.n_trials,
                       timeout=cfg.search.timeout, gc_after_trial=True, show_progress_bar=progress,
                       callbacks=[tracking.log_best_so_far(parent.info.run_id)])
        result = summary(study)
        mlflow.log_metric("wall_s", time.monotonic() - start)
        for key in ("complete", "pruned", "fail"):
            mlflow.log_metric(f"n_{key}", result[key])
    return study
