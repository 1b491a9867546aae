"""Sampler and pruner factories: the study file's ``search`` section as Optuna objects."""
from __future__ import annotations

import optuna

from mnist_opt.study.config import StudyConfig
from mnist_opt.study.space import grid_space


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
    """The study file's pruner; its epochs become Optuna steps (reports: ``report_every``)."""
    s = cfg.search
    if s.pruner == "hyperband":
        # max_resource is the epoch budget: "auto" would prune nothing until a trial completes.
        return optuna.pruners.HyperbandPruner(
            min_resource=s.optuna_steps(s.min_resource), max_resource=s.optuna_steps(cfg.training.max_epochs),
            reduction_factor=s.reduction_factor)
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.n_startup_trials // 2 or 1,
                                           n_warmup_steps=s.optuna_steps(s.n_warmup_steps))
    return optuna.pruners.NopPruner()

