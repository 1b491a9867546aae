"""Search spaces: the study file's ranges turned into define-by-run ``trial.suggest_*`` calls.

Per-layer parameters exist only for the layers a trial has (``units_l2`` only when
``n_layers > 2``), so samplers never tune a parameter that does nothing. The same function
run on an ``optuna.trial.FixedTrial`` rebuilds a finished trial's full params for retraining.
"""
from __future__ import annotations

from typing import Any

import optuna

from mnist_opt.study.config import Choice, ParamSpec, Range, StudyConfig

# Values used when a study file leaves a parameter out.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"n_layers": 2, "units": 128, "dropout": 0.0, "batch_norm": False, "activation": "relu"},
    "cnn": {"n_blocks": 2, "filters": 32, "kernel_size": 3, "padding": "same", "pooling": "max",
            "batch_norm": False, "activation": "relu", "conv_dropout": 0.0, "head": "dense",
            "dense_units": 128, "dropout": 0.0, "convs_per_block": 1, "augment": 0.0},
    "training": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128,
                 "lr_schedule": "none", "lr_decay": 0.9, "weight_decay": 1e-4},
}
DEPTH = {"mlp": ("n_layers", "l", ("units", "dropout")), "cnn": ("n_blocks", "b", ("filters",))}


def _suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, spec.choices)
    if isinstance(spec, Range):
        if spec.is_int:
            return trial.suggest_int(name, int(spec.low), int(spec.high),
                                     step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return spec  # a fixed value: part of the params, not searched


def _spec(cfg: StudyConfig, key: str, group: str) -> ParamSpec | list[ParamSpec]:
    return cfg.space.get(key, DEFAULTS[group][key])


def _layer_spec(cfg: StudyConfig, key: str, i: int) -> ParamSpec:
    """Layer ``i``'s spec of a per-layer parameter: one for all, or a list (last one repeats)."""
    spec = _spec(cfg, key, cfg.model)
    return spec[min(i, len(spec) - 1)] if isinstance(spec, list) else spec


def suggest_params(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """Sample one configuration; returns the full params dict that ``build_model`` takes."""
    params: dict[str, Any] = {}
    depth_key, suffix, per_layer = DEPTH[cfg.model]
    params[depth_key] = int(_suggest(trial, depth_key, _spec(cfg, depth_key, cfg.model)))
    for i in range(params[depth_key]):
        for key in per_layer:
            params[f"{key}_{suffix}{i}"] = _suggest(trial, f"{key}_{suffix}{i}",
                                                    _layer_spec(cfg, key, i))
    for key in DEFAULTS[cfg.model]:
        if key != depth_key and key not in per_layer:
            params[key] = _suggest(trial, key, _spec(cfg, key, cfg.model))
    for key in DEFAULTS["training"]:
        if key == "lr_decay" and params.get("lr_schedule") != "exponential":
            continue  # conditional: only exists with a schedule
        if key == "weight_decay" and params.get("optimizer") != "adamw":
            continue
        params[key] = _suggest(trial, key, _spec(cfg, key, "training"))
    return params


def grid_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """Every searched parameter's grid values, for ``optuna.samplers.GridSampler``."""
    grid: dict[str, list[Any]] = {}
    depth_key, suffix, per_layer = DEPTH[cfg.model]
    depth_spec = _spec(cfg, depth_key, cfg.model)

    def add(name: str, spec: ParamSpec) -> None:
        if isinstance(spec, Choice):
            grid[name] = list(spec.choices)
        elif isinstance(spec, Range):
            if spec.grid is not None:
                grid[name] = [int(v) if spec.is_int else v for v in spec.grid]
            else:
                grid[name] = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))

    add(depth_key, depth_spec)
    max_depth = max(grid.get(depth_key, [depth_spec]))
    for i in range(int(max_depth)):
        for key in per_layer:
            add(f"{key}_{suffix}{i}", _layer_spec(cfg, key, i))
    for group in (cfg.model, "training"):
        for key in DEFAULTS[group]:
            if key != depth_key and key not in per_layer:
                add(key, _spec(cfg, key, group))
    return grid


def baseline_params(cfg: StudyConfig) -> dict[str, Any]:
    """The study's baseline as a full params dict: its fixed values over :data:`DEFAULTS`."""
    if cfg.baseline is None:
        raise ValueError(f"study {cfg.name!r} names no baseline")
    fixed = cfg.model_copy(update={"space": dict(cfg.baseline.params)})
    return suggest_params(optuna.trial.FixedTrial({}), fixed)
