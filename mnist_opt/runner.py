"""The study runner: Optuna storage, sampler and pruner from the study file, and the objective."""
from __future__ import annotations

import gc
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import keras
import mlflow
import optuna

from mnist_opt import data, interrupt, objectives, tracking
from mnist_opt.callbacks import TrialCallback
from mnist_opt.config import StudyConfig
from mnist_opt.models import build_model
from mnist_opt.progress import StudyProgress
from mnist_opt.space import grid_space, suggest_params
from mnist_opt.storage import make_storage, resolve_storage
from mnist_opt.training import train


def make_sampler(cfg: StudyConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study file's sampler; parallel workers get distinct seeds (else identical picks)."""
    s, seed = cfg.search, cfg.search.seed + 1000 * seed_offset
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":  # the study file's n_startup_trials is its population size
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, s.n_startup_trials))
    if s.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.GridSampler(grid_space(cfg), seed=seed)


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
        directions=cfg.directions, load_if_exists=True)
    old = study.user_attrs.get("config_digest")
    if old and old != cfg.digest:
        optuna.logging.get_logger("mnist_opt").warning(
            "study file %s changed since this study began (digest %s → %s); trials of both "
            "versions are mixed in one study", cfg.path, old, cfg.digest)
    for key, value in {"config_digest": cfg.digest, "dataset": cfg.dataset, "model": cfg.model,
                       "metric": cfg.search.metric}.items():
        study.set_user_attr(key, value)
    return study


def rss_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return float("nan")


def make_objective(cfg: StudyConfig, split: data.Split, parent: mlflow.entities.Run,
                   verbose: bool = True, freeze: bool = False):
    """``objective(trial)``: suggest, build, train with the reporting callback, log the model.

    ``freeze`` (recycled worker processes): after each trial's collection, freeze what
    survives, so the next collection scans one trial's objects, not every graph TensorFlow
    leaked. A long-lived process must not: frozen objects that die later are never freed.
    """

    second = cfg.search.second_objective

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        params = suggest_params(trial, cfg)
        with tracking.trial_run(trial, params, parent):
            try:
                # A fresh graph and names, and the last trial's model collected.
                keras.backend.clear_session(free_memory=False)
                gc.collect()
                if freeze:
                    gc.freeze()
                keras.utils.set_random_seed(cfg.search.seed + trial.number)
                model = build_model(params)
                trial.set_user_attr("n_params", model.count_params())
                mlflow.log_param("n_params", model.count_params())
                callback = TrialCallback(trial, cfg.search.metric, cfg.training.max_epochs,
                                         label=f"trial {trial.number}", verbose=verbose,
                                         report=second is None)  # no pruning with two
                history = train(model, params, (split.x_train, split.y_train),
                                (split.x_val, split.y_val), cfg.training.max_epochs, [callback],
                                seed=cfg.search.seed + trial.number)
                tracking.log_model(model)
                trial.set_user_attr("val_accuracy", float(history.history["val_accuracy"][-1]))
                trial.set_user_attr("epochs", len(history.epoch))
                value = float(history.history[cfg.search.metric][-1])
                if second is None:
                    return value
                cost = (float(model.count_params()) if second == "n_params"
                        else objectives.latency_ms(model))
                mlflow.log_metric(second, cost)
                return value, cost
            finally:  # the memory figure of `make bench`, and a leak shows in the MLflow UI
                rss = rss_mb()
                trial.set_user_attr("rss_mb", rss)
                trial.set_user_attr("pid", os.getpid())
                mlflow.log_metric("rss_mb", rss)

    return objective


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def summary(study: optuna.Study, tolerance: float) -> dict[str, Any]:
    """Trial counts, and the best trial (by :func:`objectives.pick` with two objectives)."""
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    out: dict[str, Any] = {s: states.count(s) for s in ("complete", "pruned", "fail")}
    if out["complete"]:
        best = objectives.pick(study, tolerance)
        out.update(best_trial=best.number, best_value=best.values[0], best_values=best.values,
                   best_params=best.params)
        if objectives.is_multi(study):
            out["pareto"] = sorted(t.number for t in study.best_trials)
    return out


def optimize(cfg: StudyConfig, study: optuna.Study, split: data.Split, parent: mlflow.entities.Run,
             n_trials: int, verbose: bool, callbacks: Sequence = (), freeze: bool = False) -> None:
    """One worker's share: up to ``n_trials`` trials, stopping early once the study has its target."""
    study.optimize(
        make_objective(cfg, split, parent, verbose, freeze), n_trials=n_trials,
        timeout=cfg.search.timeout, catch=(Exception,), gc_after_trial=False,
        callbacks=[optuna.study.MaxTrialsCallback(cfg.search.n_trials, states=FINISHED),
                   tracking.log_best_so_far(parent.info.run_id, cfg.search.pick_tolerance),
                   lambda study, trial: interrupt.check(), *callbacks])


def run_study(cfg: StudyConfig, storage: str | None = None, verbose: bool = True,
              progress: bool = True, workers: int = 1, callbacks: Sequence = ()) -> optuna.Study:
    """Bring the study to ``cfg.search.n_trials`` finished (complete or pruned) trials.

    ``n_trials`` is the study's target, not a count per invocation (optuna #2638): a
    re-run after an interruption does only what is missing, and one that has them does
    nothing. A trial that raises is recorded as failed and the search goes on. With
    ``workers > 1`` the storage, study, MLflow experiment and parent run are created here
    first (fresh SQLite files race on table creation), then worker processes share them.
    ``callbacks`` are extra Optuna callbacks (in-process runs only; the benchmark uses one).
    """
    url = resolve_storage(storage)
    # Everything that can be wrong with the input is found before anything is written.
    split = data.split(data.load(cfg.dataset), cfg.data.val_fraction, cfg.data.seed,
                       cfg.search_subset)
    experiment = tracking.open_experiment(cfg.name)
    study = open_study(cfg, make_storage(url))
    with warnings.catch_warnings():  # experimental since 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    done = n_finished(study)
    remaining = cfg.search.n_trials - done
    if remaining <= 0:
        print(f"study {cfg.name} already has {done} finished trials (target "
              f"n_trials={cfg.search.n_trials}): nothing to run. Raise --n-trials to search more.")
        return study
    tracking.close_orphans(study, experiment)
    if done:
        print(f"continuing study {cfg.name}: {done} finished trials in storage, {remaining} to go",
              flush=True)
    extra = {"n_train": len(split.y_train), "n_val": len(split.y_val), "workers": workers,
             "sampler_class": type(study.sampler).__name__,
             "pruner_class": type(study.pruner).__name__, "trials_before": len(study.trials)}
    if cfg.search.pruner == "hyperband":
        extra["hyperband_brackets"] = hyperband_brackets(cfg)
    start = time.monotonic()
    with tracking.study_run(cfg, url, extra) as parent:  # an ActiveRun is a Run
        study.set_user_attr("last_mlflow_parent_run_id", parent.info.run_id)
        bar = StudyProgress(study, remaining, progress, cfg.search.pick_tolerance)
        try:
            if workers == 1:
                optimize(cfg, study, split, parent, remaining, verbose, [*callbacks, bar.refresh])
            else:
                from mnist_opt.workers import run_workers

                run_workers(cfg, url, parent.info.run_id, remaining, workers, verbose, bar)
        finally:
            bar.close()
            result = summary(study, cfg.search.pick_tolerance)
            mlflow.log_metric("wall_s", time.monotonic() - start)
            for key in ("complete", "pruned", "fail"):
                mlflow.log_metric(f"n_{key}", result[key])
            log_plots(study, cfg.objective_names)
    return study


def log_plots(study: optuna.Study, names: list[str] | None = None) -> None:
    """Optuna's standard plots of the whole study, as artifacts of the active (parent) run."""
    import tempfile

    from mnist_opt.plots import write_plots

    with tempfile.TemporaryDirectory(prefix="mnist_opt_plots_") as tmp:
        skipped = write_plots(study, Path(tmp), plotly_js="cdn", target_names=names)
        mlflow.log_artifacts(tmp, "plots")
    if skipped:
        mlflow.set_tag("plots_skipped", "; ".join(f"{k}: {v}" for k, v in skipped.items())[:5000])
