"""Search spaces: the study file's ranges turned into define-by-run ``trial.suggest_*`` calls.

Per-layer parameters exist only for the layers a trial has (``units_l2`` only when
``n_layers > 2``), so samplers never tune a parameter that does nothing. The same function
run on an ``optuna.trial.FixedTrial`` rebuilds a finished trial's full params for retraining.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import optuna

from mnist_opt.study.checks import Problem
from mnist_opt.study.config import Choice, InvalidStudyFile, ParamSpec, Range, StudyConfig
from mnist_opt.study.params import FAMILIES, PARAMS, TRAINING, Param, layer_name, params_of, table

# Derived from the parameter table: a parameter's default and the per-layer layout.
DEFAULTS: dict[str, dict[str, Any]] = {
    family: {p.name: p.default for p in PARAMS if family in p.families}
    for family in (*FAMILIES, TRAINING)}
DEPTH = {model: (f.depth, f.suffix, tuple(p.name for p in params_of(model) if p.per_layer))
         for model, f in FAMILIES.items()}


def _suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, spec.choices)
    if isinstance(spec, Range):
        if spec.is_int:
            return trial.suggest_int(name, int(spec.low), int(spec.high),
                                     step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return spec  # a fixed value: part of the params, not searched


def _spec(cfg: StudyConfig, key: str) -> ParamSpec | list[ParamSpec]:
    return cfg.space.get(key, table(cfg.model)[key].default)


def _layer_spec(cfg: StudyConfig, key: str, i: int) -> ParamSpec:
    """Layer ``i``'s spec of a per-layer parameter: one for all, or a list (last one repeats)."""
    spec = _spec(cfg, key)
    return spec[min(i, len(spec) - 1)] if isinstance(spec, list) else spec


def _layers(cfg: StudyConfig, depth: int) -> list[tuple[str, ParamSpec]]:
    """``(units_l0, spec), (dropout_l0, spec), (units_l1, …)``: the per-layer parameters of
    ``depth`` layers, layer by layer."""
    per_layer = DEPTH[cfg.model][2]
    return [(layer_name(cfg.model, key, i), _layer_spec(cfg, key, i))
            for i in range(depth) for key in per_layer]


def _exists(p: Param, params: dict[str, Any]) -> bool:
    """A conditional parameter exists only while its condition holds (``lr_decay`` needs a
    schedule), so samplers never tune a parameter that does nothing."""
    return p.when is None or params.get(p.when[0]) in p.when[1]


def suggest_params(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """Sample one configuration; returns the full params dict that ``build_model`` takes."""
    params: dict[str, Any] = {}
    depth_key = FAMILIES[cfg.model].depth
    for p in params_of(cfg.model):
        if p.per_layer or not _exists(p, params):
            continue
        params[p.name] = _suggest(trial, p.name, _spec(cfg, p.name))
        if p.name == depth_key:
            params[p.name] = int(params[p.name])
            params.update((name, _suggest(trial, name, spec))
                          for name, spec in _layers(cfg, params[p.name]))
    return params


def grid_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """Every searched parameter's grid values, for ``optuna.samplers.GridSampler``."""
    grid: dict[str, list[Any]] = {}
    depth_key = FAMILIES[cfg.model].depth

    def add(name: str, spec: ParamSpec) -> None:
        if isinstance(spec, Choice):
            grid[name] = list(spec.choices)
        elif isinstance(spec, Range):
            if spec.grid is not None:
                grid[name] = [int(v) if spec.is_int else v for v in spec.grid]
            else:
                grid[name] = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))

    for p in params_of(cfg.model):
        if p.per_layer:
            continue
        add(p.name, _spec(cfg, p.name))
        if p.name == depth_key:
            for name, spec in _layers(cfg, int(max(grid.get(depth_key, [_spec(cfg, depth_key)])))):
                add(name, spec)
    return grid


class MidpointTrial:
    """Stands in for an Optuna trial in :func:`suggest_params`: the middle of every range
    (geometric for log ranges, on its step grid) and the first of every choice — a
    configuration to try before any trial exists (``lr-find``)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        mid = math.sqrt(low * high) if log else (low + high) / 2
        return low + round((mid - low) / step) * step if step else mid

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return int(round(self.suggest_float(name, low, high, step if step > 1 else None, log)))


class ValuesTrial:
    """Stands in for an Optuna trial in :func:`suggest_params`: the given trial parameters,
    each checked against the distribution it meets; a missing one takes the midpoint (a
    sampler would draw it), so the conditions downstream are followed as a trial would."""

    def __init__(self, values: dict[str, Any]):
        self.values, self.asked = dict(values), set()
        self.problems: list[tuple[str, str]] = []

    def _take(self, name: str, fits: bool | None, allowed: str, default: Any) -> Any:
        self.asked.add(name)
        if name not in self.values:
            return default
        if not fits:
            self.problems.append((name, f"{self.values[name]!r} is not in the space: {allowed}"))
            return default
        return self.values[name]

    def _number(self, name: str, low: float, high: float, integer: bool) -> bool | None:
        v = self.values.get(name)
        return (not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
                and low <= v <= high)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        v = self.values.get(name)
        fits = any(v == c and type(v) is type(c) for c in choices)
        return self._take(name, fits, f"one of {list(choices)}", choices[0])

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        return self._take(name, self._number(name, low, high, False), f"[{low:g}, {high:g}]",
                          MidpointTrial().suggest_float(name, low, high, step, log))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self._take(name, self._number(name, low, high, True),
                          f"an integer in [{low}, {high}]",
                          MidpointTrial().suggest_int(name, low, high, step, log))


def value_problems(cfg: StudyConfig, values: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for each of ``values`` (trial parameters: ``units_l0``, …) that the
    space would not suggest: out of its range or choices, or not searched given the others."""
    trial = ValuesTrial(values)
    suggest_params(trial, cfg)  # type: ignore[arg-type]
    unknown = [(key, f"not a searched parameter of this space with these values; searched: "
                     f"{', '.join(sorted(trial.asked))}")
               for key in values if key not in trial.asked]
    return trial.problems + unknown


def check_enqueue(cfg: StudyConfig) -> StudyConfig:
    """``cfg``, or :class:`InvalidStudyFile` naming each value of ``search.enqueue`` that its
    space would not suggest (the runner and ``mnist-opt check`` call it: the schema in
    :mod:`~.config` cannot, since the space is built on it)."""
    problems = [Problem(f"search.enqueue[{i}].{key}", message)
                for i, values in enumerate(cfg.search.enqueue)
                for key, message in value_problems(cfg, values)]
    if problems:
        raise InvalidStudyFile(cfg.path or cfg.name, problems)
    return cfg


def fixed_space(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """A space that fixes every parameter to a full params dict (per-layer ones as lists):
    the inverse of :func:`suggest_params`, so a trial's configuration can run as a study."""
    depth_key, _, per_layer = DEPTH[model]
    space = {key: value for key, value in params.items() if key in table(model)}
    for key in per_layer:
        space[key] = [params[layer_name(model, key, i)] for i in range(params[depth_key])]
    return space


def baseline_params(cfg: StudyConfig) -> dict[str, Any]:
    """The study's baseline as a full params dict: its fixed values over the table's defaults."""
    if cfg.baseline is None:
        raise ValueError(f"study {cfg.name!r} names no baseline")
    fixed = cfg.model_copy(update={"space": dict(cfg.baseline.params)})
    return suggest_params(optuna.trial.FixedTrial({}), fixed)
