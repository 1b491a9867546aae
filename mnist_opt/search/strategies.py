"""What ``mnist-opt compare`` compares: strategies, budgets, and the plan of repeats.

A strategy is one way to search a study's space: a sampler × pruner of our own runner
(``tpe+hyperband``, :class:`OptunaStrategy`) or one of keras-tuner's tuners (``kt-hyperband``,
``kt-bayesian``, ``kt-random``, :class:`KerasTunerStrategy`, when the ``bench`` extra is
installed). Every repeat is described by a generated study file (the study's space
and data, the strategy, a seed, the budget) and run by the strategy's command in a fresh
process, so for every tool the clock starts when that tool's process starts. What a
strategy's process must leave behind: the repeat's Optuna study (already created, in the
storage it is given) holding its trials, each with its ``epoch_log``.

Light: nothing here imports TensorFlow, Keras, MLflow or Optuna, so a bad strategy or budget
is refused at once, before anything is written.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from mnist_opt.errors import MnistOptError, StudyFileError
from mnist_opt.study.checks import did_you_mean
from mnist_opt.study.config import SearchConfig, StudyConfig, validate

# The samplers and pruners a study file allows, less the grid: it needs `grid:` values for
# every range and stops when they run out, so it is no strategy to race against a budget.
SAMPLERS = tuple(s for s in typing.get_args(SearchConfig.model_fields["sampler"].annotation)
                 if s != "grid")
PRUNERS = tuple(typing.get_args(SearchConfig.model_fields["pruner"].annotation))
# keras-tuner's tuners, as ``compare`` names them, and the class each is in keras_tuner.
KT_TUNERS = {"kt-hyperband": "Hyperband", "kt-bayesian": "BayesianOptimization",
             "kt-random": "RandomSearch"}
# Without a trial budget no trial count stops a repeat: its budget does.
N_TRIALS = 100_000
# keras-tuner as its documentation starts a user (`compare`'s "out of the box" mode):
# ``kt-hyperband-defaults`` etc.
DEFAULTS = "-defaults"


class StrategyError(MnistOptError):
    """A strategy, budget or repeat count that ``compare`` cannot run."""


@dataclass(frozen=True)
class Budget:
    """What every repeat gets: wall seconds (``search.timeout``: no new trial after it, counted
    from the start of the search in the repeat's process), epochs (``search.epoch_budget``:
    no new trial once all trials together completed that many) or trials (``search.n_trials``:
    no new trial once that many ended, as each tool counts its trials)."""
    seconds: int | None = None
    epochs: int | None = None
    trials: int | None = None

    def __post_init__(self) -> None:
        given = {flag: value for flag, value in (("--budget-seconds", self.seconds),
                                                 ("--budget-epochs", self.epochs),
                                                 ("--budget-trials", self.trials))
                 if value is not None}
        if len(given) != 1:
            raise StrategyError("give one budget: --budget-seconds S, --budget-epochs E or "
                                "--budget-trials N")
        (flag, value), = given.items()
        if value < 1:
            raise StrategyError(f"{flag} must be a positive integer, got {value}")

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds} s per repeat (no new trial after it)"
        if self.epochs is not None:
            return f"{self.epochs} epochs per repeat (no new trial once its trials completed them)"
        return f"{self.trials} trials per repeat"

    def search(self) -> dict[str, int | None]:
        """The study file's ``search`` keys that set it (no trial count: the budget stops)."""
        return {"timeout": self.seconds, "epoch_budget": self.epochs,
                "n_trials": self.trials or N_TRIALS}


class Strategy(Protocol):
    """One kind of search, as ``compare`` runs it."""
    label: str  # as the user writes it and the table shows it: "tpe+hyperband"
    slug: str   # in study names and MLflow keys: "tpe-hyperband"

    def document(self, base: dict[str, Any], seed: int, budget: Budget) -> dict[str, Any]:
        """The repeat's study file, from the study's own document (``base``, not modified)."""

    def check(self, document: dict[str, Any], path: Path) -> StudyConfig:
        """The document as the repeat's process will read it; raises on a problem."""

    def command(self, study_file: Path, storage: str, workers: int,
                verbose: bool) -> list[str]:
        """The repeat's process: it runs the study file's search into ``storage``."""


# What a variant of the study file leaves out (``SAMPLER+PRUNER:VARIANT``), to measure what a
# recipe of the file brings against the same search without it: name -> (the (section, key)s
# it drops, the one the file must set for the variant to differ from it).
VARIANTS = {
    # subset search (+ promotion) against searching all training images
    "full-data": ((("data", "search_subset"), ("search", "promote")), ("data", "search_subset")),
    # subset search with promotion against the same search without it
    "no-promote": ((("search", "promote"),), ("search", "promote")),
}


@dataclass(frozen=True)
class OptunaStrategy:
    """A sampler and a pruner of our own runner: ``mnist-opt study`` on the repeat's file.

    ``variant`` (one of :data:`VARIANTS`): the study file without what it names, e.g.
    ``gp+hyperband:full-data`` searches all training images and promotes nothing."""
    sampler: str
    pruner: str
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.sampler}+{self.pruner}" + f":{self.variant}" * bool(self.variant)

    @property
    def slug(self) -> str:
        return f"{self.sampler}-{self.pruner}" + f"-{self.variant}" * bool(self.variant)

    def document(self, base: dict[str, Any], seed: int, budget: Budget) -> dict[str, Any]:
        """Raises :class:`StudyFileError` for a variant that would leave nothing out: the same
        search twice, under two names."""
        doc = copy.deepcopy(base)
        if self.variant:
            drops, needed = VARIANTS[self.variant]
            if doc.get(needed[0], {}).get(needed[1]) is None:
                raise StudyFileError(
                    f"the study file sets no {'.'.join(needed)}, so :{self.variant} would "
                    "search as the study does, or as another variant: leave it out")
            for section, key in drops:
                doc.get(section, {}).pop(key, None)
        search = doc.setdefault("search", {})
        search.update(sampler=self.sampler, pruner=self.pruner, seed=seed, **budget.search())
        return doc

    def check(self, document: dict[str, Any], path: Path) -> StudyConfig:
        return validate(document, path)

    def command(self, study_file: Path, storage: str, workers: int,
                verbose: bool) -> list[str]:
        return [sys.executable, "-m", "mnist_opt", "study", str(study_file), "--storage", storage,
                "-q", "--workers", str(workers), *(["-v"] if verbose else [])]


@dataclass(frozen=True)
class KerasTunerStrategy:
    """One of keras-tuner's tuners on the study's space, data and model builder:
    ``python -m mnist_opt.search.kt_repeat`` on the repeat's file (see that module).

    keras-tuner has no local parallel mode, so it runs in one process: ``compare`` refuses it
    with ``--workers`` > 1 rather than comparing one process against several
    (:func:`check_workers`).

    ``defaults``: keras-tuner as its documentation starts a user instead (the bench's "out of
    the box" mode): ``model.fit`` on NumPy arrays, one step per compiled call, the tuner's own
    ``hyperband_iterations`` (1) and ``num_initial_points`` (3 per dimension).
    """
    name: str  # "kt-hyperband"
    defaults: bool = False
    max_workers = 1

    @property
    def label(self) -> str:
        return self.name + DEFAULTS * self.defaults

    @property
    def slug(self) -> str:
        return self.label

    @property
    def tuner(self) -> str:
        """The tuner's class in keras_tuner: ``Hyperband``."""
        return KT_TUNERS[self.name]

    def document(self, base: dict[str, Any], seed: int, budget: Budget) -> dict[str, Any]:
        """The study's document with the repeat's seed and budget. ``sampler``/``pruner``
        are left as the study file has them: keras-tuner's tuner is chosen by the command;
        ``n_startup_trials`` is the Bayesian tuner's ``num_initial_points``."""
        doc = copy.deepcopy(base)
        doc.setdefault("search", {}).update(seed=seed, **budget.search())
        return doc

    def check(self, document: dict[str, Any], path: Path) -> StudyConfig:
        cfg = validate(document, path)
        if cfg.search.metric != "val_accuracy" or cfg.search.second_objective:
            raise StudyFileError(
                f"{self.name}: keras-tuner searches one objective, val_accuracy; this study's "
                f"are {', '.join(cfg.objective_names)}")
        if not float(cfg.training.max_epochs).is_integer():
            raise StudyFileError(
                f"{self.name}: keras-tuner trains whole epochs; training.max_epochs is "
                f"{cfg.training.max_epochs}: give a whole number (--max-epochs N)")
        return cfg

    def command(self, study_file: Path, storage: str, workers: int,
                verbose: bool) -> list[str]:
        return [sys.executable, "-m", "mnist_opt.search.kt_repeat", str(study_file),
                "--storage", storage, "--tuner", self.name,
                *(["--defaults"] if self.defaults else []), *(["-v"] if verbose else [])]


def keras_tuner_installed() -> bool:
    """Whether keras_tuner can be imported (found without importing it: that loads TF)."""
    return importlib.util.find_spec("keras_tuner") is not None


def parse_strategies(texts: list[str]) -> list[Strategy]:
    """``SAMPLER+PRUNER`` strings and keras-tuner names (``kt-random``) as strategies; one
    error names every bad one and the allowed."""
    unknown, twice, out = [], [], []
    for text in texts:
        name = text.strip().lower()
        if name.removesuffix(DEFAULTS) in KT_TUNERS:
            strategy: Strategy = KerasTunerStrategy(name.removesuffix(DEFAULTS),
                                                    name.endswith(DEFAULTS))
        else:
            pair, colon, variant = name.partition(":")
            sampler, plus, pruner = pair.partition("+")
            if (not plus or sampler not in SAMPLERS or pruner not in PRUNERS
                    or (colon and variant not in VARIANTS)):
                hint = (did_you_mean(name, list(KT_TUNERS)) if name.startswith("kt")
                        else did_you_mean(sampler, list(SAMPLERS)) if sampler not in SAMPLERS
                        else did_you_mean(pruner, list(PRUNERS)) if plus and pruner not in PRUNERS
                        else did_you_mean(variant, list(VARIANTS)) if colon and plus else "")
                unknown.append(f"{text!r}{hint}")
                continue
            strategy = OptunaStrategy(sampler, pruner, variant)
        if strategy in out:
            twice.append(repr(text))
        else:
            out.append(strategy)
    if unknown:
        raise StrategyError(
            f"unknown strateg{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}: a "
            f"strategy is SAMPLER+PRUNER with SAMPLER one of {', '.join(SAMPLERS)} and PRUNER "
            f"one of {', '.join(PRUNERS)} (e.g. tpe+hyperband random+none), optionally "
            f":VARIANT with VARIANT one of {', '.join(VARIANTS)} (the study file without "
            f"its search_subset and promote, or without promote), or one of "
            f"keras-tuner's {', '.join(KT_TUNERS)} (add {DEFAULTS} for its defaults)")
    if twice:
        raise StrategyError(f"--strategies names {', '.join(twice)} twice: name each once")
    if not out:
        raise StrategyError("--strategies names none: give at least one SAMPLER+PRUNER")
    kt = [s.label for s in out if isinstance(s, KerasTunerStrategy)]
    if kt and not keras_tuner_installed():
        raise StrategyError(
            f"{', '.join(kt)} need{'s' * (len(kt) == 1)} keras-tuner, which is not installed: "
            "pip install -e '.[bench]' (or `make bench`, which installs it), then run again")
    return out


def check_workers(strategies: list[Strategy], workers: int) -> None:
    """Refuse strategies that cannot run with ``workers`` processes: every strategy gets the
    same number, or the comparison is not like for like."""
    few = [s.label for s in strategies if getattr(s, "max_workers", None) is not None
           and workers > s.max_workers]
    if few:
        raise StrategyError(
            f"{', '.join(few)} run{'s' * (len(few) == 1)} in one process (keras-tuner has no "
            f"local parallel mode), so --workers {workers} would not be like for like: compare "
            "them with --workers 1 (the default)")


@dataclass(frozen=True)
class Repeat:
    """Repeat ``index`` of ``strategy``: its own study, ``name``, run from ``study_file``."""
    strategy: Strategy
    index: int
    seed: int
    name: str
    study_file: Path
    document: dict[str, Any]
    config: StudyConfig


def repeat_name(study: str, strategy: Strategy, index: int) -> str:
    """``mlp_tpe.cmp.tpe-hyperband.r0`` (``.vN`` would name a version of the study file)."""
    return f"{study}.cmp.{strategy.slug}.r{index}"


def plan(cfg: StudyConfig, strategies: list[Strategy], repeats: int, budget: Budget,
         folder: Path, max_epochs: int | None = None,
         train_subset: int | None = None) -> list[Repeat]:
    """Every repeat of every strategy, checked as its process will read it; writes nothing.

    Repeat ``r`` of every strategy has the seed ``search.seed + r``: different seeds across
    repeats, the same seeds across strategies. ``max_epochs`` and ``train_subset`` override
    the study file's, for every repeat.
    """
    if repeats < 1:
        raise StrategyError(f"--repeats must be a positive integer, got {repeats}")
    for flag, value in (("--max-epochs", max_epochs), ("--train-subset", train_subset)):
        if value is not None and value < 1:
            raise StudyFileError(f"{flag} must be a positive integer, got {value}")
    base = yaml.safe_load(Path(cfg.path).read_text())  # the file as written: ints stay ints
    if max_epochs is not None:
        base.setdefault("training", {})["max_epochs"] = max_epochs
    if train_subset is not None:
        base.setdefault("data", {})["train_subset"] = train_subset
    out, problems = [], []
    for strategy in strategies:
        for index in range(repeats):
            name = repeat_name(cfg.name, strategy, index)
            seed = cfg.search.seed + index
            path = (folder / "studies" / f"{name}.yaml").resolve()
            try:
                document = strategy.document(base, seed, budget)
                config = strategy.check(document, path)
            except StudyFileError as exc:  # the same for every repeat: said once
                found = getattr(exc, "problems", None)
                problems += ([f"strategy {strategy.label}: {p.path}: {p.message}" for p in found]
                             if found else [f"strategy {strategy.label}: {exc}"])
                break
            out.append(Repeat(strategy, index, seed, name, path, document, config))
    if problems:
        raise StrategyError(f"these strategies cannot search {cfg.path}:\n" + "\n".join(problems))
    return out


def write_study_file(repeat: Repeat) -> Path:
    """The repeat's study file, as its process will read it."""
    repeat.study_file.parent.mkdir(parents=True, exist_ok=True)
    repeat.study_file.write_text(
        f"# mnist-opt compare: {repeat.strategy.label}, repeat {repeat.index}, seed "
        f"{repeat.seed} (generated; rerunning compare rewrites it)\n"
        + yaml.safe_dump(repeat.document, sort_keys=False))
    return repeat.study_file
