"""The study runner: open (or continue) a study and bring it to its target of finished trials,
in this process or in worker processes, under one MLflow parent run."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

import keras
import mlflow
import optuna

from mnist_opt.errors import StudyFailedError
from mnist_opt.search import versions
from mnist_opt.search.objective import (budget_spent, check_failures, epochs_done, failure_streak,
                                        finished_since, optimize, started, summary)
from mnist_opt.search.progress import StudyProgress
from mnist_opt.search.promote import promote
from mnist_opt.search.samplers import make_pruner, make_sampler
from mnist_opt.search.slots import fail_stale, n_finished
from mnist_opt.search.warm import ENQUEUED, warm_start
from mnist_opt.study.config import StudyConfig
from mnist_opt.study.objectives import PROMOTED_BEST
from mnist_opt.study.space import check_enqueue
from mnist_opt.tracking import runs as tracking
from mnist_opt.tracking.storage import make_storage, owner_gone, resolve_storage
from mnist_opt.training.backend import apply as apply_backend
from mnist_opt.training.loop import study_split


def open_study(cfg: StudyConfig, storage: str | optuna.storages.BaseStorage, mix: bool = False,
               argument: str | None = None) -> tuple[optuna.Study, dict[str, str]]:
    """Create the study, or continue it (``load_if_exists``) if its file still searches the
    same way; a changed file is refused before anything is written, unless ``mix``.

    Returns the study and what the MLflow parent run records of a mix (``argument``: how the
    user named the study, for the error's suggested commands).
    """
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, sampler=make_sampler(cfg), pruner=make_pruner(cfg),
        directions=cfg.directions, load_if_exists=True)
    changed = versions.changes(study, cfg)
    if changed != [] and n_finished(study) >= cfg.search.n_trials:
        return study, {}  # nothing will run, so nothing is mixed: the study stays as it was
    if changed != [] and not mix:
        versions.refuse(study, cfg, changed, argument or cfg.name)
    recorded = versions.record(study, cfg, changed if changed != [] else None)
    with warnings.catch_warnings():  # experimental since 3.2; names the values in plots
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(cfg.objective_names)
    for key, value in {"dataset": cfg.dataset, "model": cfg.model,
                       "metric": cfg.search.metric}.items():
        study.set_user_attr(key, value)
    return study, recorded


def run_study(cfg: StudyConfig, storage: str | None = None, verbose: bool = True,
              progress: bool = True, workers: int = 1, callbacks: Sequence = (),
              mix: bool = False, argument: str | None = None,
              warm_from: str | None = None, warm_top: int = 5) -> optuna.Study:
    """Bring the study to ``cfg.search.n_trials`` finished (complete or pruned) trials.

    ``n_trials`` is the study's target, not a count per invocation (optuna #2638): a
    re-run after an interruption does only what is missing, and one that has them does
    nothing. A trial that raises is recorded as failed and the search goes on, until
    ``search.max_consecutive_failures`` trials failed in a row (:class:`StudyFailedError`;
    so does an invocation whose trials all failed). Trials whose process died are failed
    and re-queued first (:func:`fail_stale`), and again at the end. With
    ``workers > 1`` the storage, study, MLflow experiment and parent run are created here
    first (fresh SQLite files race on table creation), then worker processes share them.
    ``callbacks`` are extra Optuna callbacks (in-process runs only; the benchmark uses one).
    ``search.epoch_budget`` stops it too: no new trial, in any worker, once the study's trials
    completed that many epochs together (``mnist-opt compare --budget-epochs``).
    A study file that changed since the study began is refused unless ``mix`` (see
    :mod:`mnist_opt.search.versions`). ``warm_from``: seed it first with that study's
    ``warm_top`` best trials (:mod:`mnist_opt.search.warm`); ``search.enqueue``'s
    configurations are queued first in any case.
    """
    url = resolve_storage(storage)
    # Everything that can be wrong with the input is found before anything is written.
    check_enqueue(cfg)
    if cfg.training.backend != "auto":  # a process whose Keras runs on another is refused
        apply_backend(cfg.training.backend)
    split = study_split(cfg)
    opened = make_storage(url)  # a bad storage URL: refused before MLflow is touched
    experiment = tracking.open_experiment(cfg.name, outer=True)  # compare's, under compare
    study, mixed = open_study(cfg, opened, mix, argument)
    fail_stale(study, url)
    # runs a killed process of this host left RUNNING, also when nothing is left to run:
    # the host of a worker killed near the end comes back to a study that is done
    tracking.close_orphans(study, experiment)
    done = n_finished(study)
    remaining = cfg.search.n_trials - done
    if remaining <= 0:
        print(f"study {cfg.name} already has {done} finished trials (target "
              f"n_trials={cfg.search.n_trials}): nothing to run. Raise --n-trials to search more.")
        if warm_from:
            print(f"--warm-start {warm_from} ignored: warm starts seed trials still to run")
        promote(cfg, study, verbose)  # what an interrupted promotion left
        return study
    if budget_spent(cfg, study):
        print(f"study {cfg.name} has spent its epoch budget ({epochs_done(study):g} of "
              f"search.epoch_budget={cfg.search.epoch_budget} epochs): nothing to run.")
        promote(cfg, study, verbose)
        return study
    if study.user_attrs.get(PROMOTED_BEST) is not None:  # new trials: ranked again at the end
        study.set_user_attr(PROMOTED_BEST, None)
    if done:
        print(f"continuing study {cfg.name}: {done} finished trials in storage, {remaining} to go",
              flush=True)
    extra = {"n_train": len(split.y_train), "n_val": len(split.y_val), "workers": workers,
             "backend": keras.backend.backend(),
             "sampler_class": type(study.sampler).__name__,
             "pruner_class": type(study.pruner).__name__, "trials_before": len(study.trials),
             **mixed}
    if cfg.search.pruner == "hyperband":
        extra["hyperband_brackets"] = cfg.hyperband_brackets
    start = time.monotonic()
    limit = cfg.search.max_consecutive_failures
    with tracking.study_run(cfg, url, extra) as parent:  # an ActiveRun is a Run
        study.set_user_attr("last_mlflow_parent_run_id", parent.info.run_id)
        mlflow.log_dict(cfg.search_section(), "search_section.json")
        seed(study, cfg, url, parent, warm_from, warm_top)
        since = started(parent)
        bar = StudyProgress(study, remaining, progress, cfg.search.pick_tolerance)
        try:
            if workers == 1:
                optimize(cfg, study, url, split, parent, remaining, verbose, [*callbacks, bar.refresh])
            else:
                from mnist_opt.search.workers import run_workers

                def stopped() -> bool:  # the parent reads it from the storage itself
                    return (bool(failure_streak(finished_since(study, since), limit))
                            or budget_spent(cfg, study))

                run_workers(cfg, url, parent.info.run_id, remaining, workers, verbose, bar, stopped)
            check_failures(study, limit, since)
        finally:
            bar.close()
            fail_stale(study, url)  # a worker killed -9 under us: its trial is failed now
            result = summary(study, cfg.search.pick_tolerance)
            mlflow.log_metric("wall_s", time.monotonic() - start)
            for key in ("complete", "pruned", "fail", "copied"):  # copied: by a warm start
                mlflow.log_metric(f"n_{key}", result[key])
            log_plots(study, cfg.objective_names)
        check_owners(study)  # inside: the parent run ends FAILED, not FINISHED
    promote(cfg, study, verbose)  # search.promote: the top-k again on the full data
    return study


def seed(study: optuna.Study, cfg: StudyConfig, url: str, parent: mlflow.entities.Run,
         warm_from: str | None, warm_top: int) -> None:
    """Queue ``search.enqueue``'s configurations (each once, however often the study is
    continued), then the warm start's trials."""
    for values in cfg.search.enqueue:
        study.enqueue_trial(values, user_attrs={ENQUEUED: "search.enqueue"},
                            skip_if_exists=True)
    if warm_from:
        print(warm_start(study, cfg, warm_from, url, warm_top, parent).line(), flush=True)


def check_owners(study: optuna.Study) -> None:
    """No success while a trial is RUNNING with no live owner (it would never finish)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if owner_gone(trial):
            raise StudyFailedError(f"trial {trial.number} is still RUNNING but its process "
                                   f"{trial.user_attrs['pid']} is gone")


def log_plots(study: optuna.Study, names: list[str] | None = None) -> None:
    """Optuna's standard plots of the whole study, as artifacts of the active (parent) run."""
    import tempfile

    from mnist_opt.reporting.plots import write_plots

    with tempfile.TemporaryDirectory(prefix="mnist_opt_plots_") as tmp:
        skipped = write_plots(study, Path(tmp), plotly_js="cdn", target_names=names)
        mlflow.log_artifacts(tmp, "plots")
    if skipped:
        mlflow.set_tag("plots_skipped", "; ".join(f"{k}: {v}" for k, v in skipped.items())[:5000])
