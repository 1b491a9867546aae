"""What the parameter table allows, checked on a study file's ``space`` and ``baseline``.

Every value a fixed entry, a choice or a range can produce must be one the builders accept,
so a bad file is refused before any trial instead of failing trial after trial. Each check
returns :class:`Problem` s (key path + what is wrong + what is allowed), never raises: one
error lists every problem in the file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from mnist_opt.study.params import FAMILIES, Param, table

RANGE_KEYS = ("low", "high", "log", "step", "grid")


@dataclass(frozen=True)
class Problem:
    path: str  # where in the file: space.activation.choices[1]
    message: str  # what is wrong with which value, and what is allowed

    def line(self, source: str) -> str:
        return f"{source}: {self.path}: {self.message}"


def did_you_mean(word: Any, options: Iterable[Any]) -> str:
    """`` (did you mean 'swish'?)`` for a near miss among ``options``, else ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(p: Param, value: Any, path: str) -> list[Problem]:
    if p.accepts(value):
        return []
    hint = did_you_mean(value, p.choices) if p.kind == "choice" else ""
    return [Problem(path, f"{value!r} is not allowed{hint}; allowed: {p.allowed}")]


def _unknown_keys(spec: dict, allowed: Iterable[str], path: str) -> list[Problem]:
    allowed = list(allowed)
    return [Problem(f"{path}.{key}", f"unknown key{did_you_mean(key, allowed)}; allowed: "
                                     f"{', '.join(allowed)}")
            for key in spec if key not in allowed]


def _choice(p: Param, spec: dict, path: str) -> list[Problem]:
    problems = _unknown_keys(spec, ["choices"], path)
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        return [*problems, Problem(f"{path}.choices", f"needs a non-empty list of values "
                                   f"(got {choices!r}); allowed values: {p.allowed}")]
    for i, choice in enumerate(choices):
        problems += _value(p, choice, f"{path}.choices[{i}]")
    return problems


def _range(p: Param, spec: dict, path: str) -> list[Problem]:
    problems = _unknown_keys(spec, [*RANGE_KEYS, "choices"], path)
    if p.kind not in ("int", "float"):
        return [*problems, Problem(path, f"a range {spec!r} is for numbers; {p.name} takes "
                                   f"{p.allowed}: give one value or {{choices: [...]}}")]
    bounds = {k: spec.get(k) for k in ("low", "high")}
    for key, value in bounds.items():
        if key not in spec:
            problems.append(Problem(path, f"a range needs low and high (got {spec!r})"))
        elif not _number(value) or (p.kind == "int" and not isinstance(value, int)):
            kind = "an integer" if p.kind == "int" else "a number"
            problems.append(Problem(f"{path}.{key}", f"{value!r} is not {kind}"))
    step = spec.get("step")
    if step is not None and (not _number(step) or step <= 0 or
                             (p.kind == "int" and not isinstance(step, int))):
        problems.append(Problem(f"{path}.step", f"{step!r} is not a positive "
                                f"{'integer' if p.kind == 'int' else 'number'}"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(Problem(f"{path}.log", f"{log!r} is not true or false"))
    if problems:
        return problems
    low, high = bounds["low"], bounds["high"]
    if low > high:
        problems.append(Problem(path, f"low ({low!r}) is above high ({high!r})"))
    if low < p.low or high > p.high:
        problems.append(Problem(path, f"[{low!r}, {high!r}] goes outside what {p.name} allows: "
                                f"{p.allowed}"))
    if log and low <= 0:
        problems.append(Problem(f"{path}.low", f"a log range needs low > 0 (got {low!r})"))
    if log and step is not None:
        problems.append(Problem(path, "a range cannot have both log and step"))
    grid = spec.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            problems.append(Problem(f"{path}.grid", f"needs a non-empty list (got {grid!r})"))
        else:
            for i, value in enumerate(grid):
                found = _value(p, value, f"{path}.grid[{i}]")
                if not found and not low <= value <= high:
                    found = [Problem(f"{path}.grid[{i}]", f"{value!r} is outside the range "
                                     f"[{low!r}, {high!r}]")]
                problems += found
    return problems


def _entry(p: Param, spec: Any, path: str) -> list[Problem]:
    """One spec: a fixed value, ``{choices: [...]}`` or ``{low, high, ...}``."""
    if isinstance(spec, dict):
        return _choice(p, spec, path) if "choices" in spec else _range(p, spec, path)
    if isinstance(spec, list):
        return [Problem(path, f"a list inside a list ({spec!r}); give one spec per layer")]
    return _value(p, spec, path)


def possible_values(spec: Any, p: Param) -> list[Any] | None:
    """The values a (valid) spec can take; None for a range (any number in it)."""
    if spec is None:
        return [p.default]
    if isinstance(spec, dict):
        return list(spec["choices"]) if "choices" in spec else None
    return spec if isinstance(spec, list) else [spec]


def max_depth(model: str, space: dict) -> int:
    """The most layers / blocks the study can build (its depth spec's largest value)."""
    p = table(model)[FAMILIES[model].depth]
    spec = space.get(p.name)
    values = possible_values(spec, p)
    return int(spec["high"]) if values is None else max(int(v) for v in values)


def check_entries(model: str, space: dict, where: str, fixed: bool = False) -> list[Problem]:
    """Each key known for ``model``, each spec one the builders accept; ``fixed``: values only
    (the baseline), no choices or ranges."""
    params, problems = table(model), []
    for key, spec in space.items():
        path, p = f"{where}.{key}", params.get(key)
        if p is None:
            problems.append(Problem(path, f"unknown parameter {key!r} for model {model!r}"
                                    f"{did_you_mean(key, params)}; allowed: {', '.join(params)}"))
        elif fixed and (isinstance(spec, dict) or
                        (isinstance(spec, list) and any(isinstance(s, dict) for s in spec))):
            problems.append(Problem(path, f"{spec!r}: a baseline fixes values; no choices or "
                                    "ranges"))
        elif isinstance(spec, list) and not p.per_layer:
            per_layer = [n for n, q in params.items() if q.per_layer]
            problems.append(Problem(path, f"{spec!r}: only per-layer parameters "
                                    f"({', '.join(per_layer)}) may be lists"))
        elif isinstance(spec, list):
            if not spec:
                problems.append(Problem(path, "an empty per-layer list"))
            for i, item in enumerate(spec):
                problems += _entry(p, item, f"{path}[{i}]")
        else:
            problems += _entry(p, spec, path)
    return problems


def check_relations(model: str, space: dict, where: str, sampler: str | None,
                    invalid: set[str] = frozenset()) -> list[Problem]:
    """Checks between parameters, on the entries that are each valid: per-layer lists no
    longer than the depth, conditions that can hold, a grid for every searched one.
    Nothing is concluded from an ``invalid`` entry (its own problem is reported already)."""
    params, problems = table(model), []
    depth_key = FAMILIES[model].depth
    depth = None if depth_key in invalid else max_depth(model, space)
    for key, spec in space.items():
        p = params.get(key)
        if p is None or key in invalid:
            continue
        if depth is not None and isinstance(spec, list) and len(spec) > depth:
            problems.append(Problem(f"{where}.{key}", f"{len(spec)} per-layer entries, but "
                                    f"{depth_key} is at most {depth}: remove the extra ones"))
        if p.when is not None and p.when[0] not in invalid:
            source, needed = p.when
            can_be = possible_values(space.get(source), params[source])
            if can_be is not None and not set(can_be) & set(needed):
                problems.append(Problem(
                    f"{where}.{key}", f"{key} exists only when {source} is "
                    f"{' or '.join(needed)}, and {source} here is only "
                    f"{', '.join(map(str, can_be))}: remove {key} or allow {needed[0]}"))
        if sampler == "grid":
            for item in spec if isinstance(spec, list) else [spec]:
                if (isinstance(item, dict) and "choices" not in item and item.get("grid") is None
                        and not (p.kind == "int" and item.get("step"))):
                    problems.append(Problem(f"{where}.{key}", "the grid sampler needs "
                                            "'grid: [values]' for this range (or an integer "
                                            "range with a step)"))
    return problems


def check_space(model: str, space: dict, sampler: str | None, where: str = "space",
                fixed: bool = False) -> list[Problem]:
    """Every problem of a ``space`` (or, ``fixed``, a baseline's ``params``) for ``model``."""
    problems = check_entries(model, space, where, fixed)
    invalid = {str(k) for k in space if any(_within(pr.path, f"{where}.{k}") for pr in problems)}
    return problems + check_relations(model, space, where, sampler, invalid)


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((f"{prefix}.", f"{prefix}["))


# The direction each metric improves in: a study maximising val_loss searches for the worst.
METRIC_DIRECTIONS = {"val_accuracy": "maximize", "val_loss": "minimize"}


def check_search(search: dict, training: dict | None = None) -> list[Problem]:
    """Settings of ``search`` that are each valid but do not go together (a value that is
    invalid on its own is the schema's to report)."""
    problems = []
    second, pruner = search.get("second_objective"), search.get("pruner", "hyperband")
    if second and isinstance(pruner, str) and pruner in ("hyperband", "median"):
        problems.append(Problem("search.pruner", f"{pruner!r}: Optuna's pruners work with one "
                                f"objective only; set 'pruner: none' for second_objective "
                                f"{second!r}"))
    metric = search.get("metric", "val_accuracy")
    direction = search.get("direction", "maximize")
    if isinstance(metric, str) and metric in METRIC_DIRECTIONS and \
            direction in ("maximize", "minimize") and METRIC_DIRECTIONS[metric] != direction:
        problems.append(Problem("search.direction", f"{direction!r} with metric {metric!r}: "
                                f"{metric} improves when it goes "
                                f"{'up' if METRIC_DIRECTIONS[metric] == 'maximize' else 'down'}; "
                                f"set direction: {METRIC_DIRECTIONS[metric]}"))
    if search.get("promote") is not None and search.get("second_objective") is not None:
        problems.append(Problem("search.promote", "a two-objective study picks from its Pareto "
                                "front; promotion ranks by validation accuracy alone: remove "
                                "search.promote or search.second_objective"))
    return problems + _report_steps(search, training or {})


def _report_steps(search: dict, training: dict) -> list[Problem]:
    """``report_every`` must cut an epoch into whole reports, and the pruner's epochs and
    ``max_epochs`` must be whole numbers of them: Optuna's steps are integers."""
    every = search.get("report_every", 1)
    if not _number(every) or not 0 < every <= 1:
        return []  # the schema reports it
    per_epoch = round(1 / every)
    if abs(per_epoch * every - 1) > 1e-9:
        return [Problem("search.report_every", f"{every!r} does not divide an epoch into whole "
                        f"reports; allowed: 1, 0.5, 0.25, 0.2, 0.1 (1/n for a whole n)")]
    return [Problem(key, f"{epochs!r} epochs is not a whole number of reports of report_every "
                    f"{every!r}: use a multiple of {every!r}, or a report_every that divides it")
            for key, epochs in (("search.min_resource", search.get("min_resource", 1)),
                                ("training.max_epochs", training.get("max_epochs", 1)))
            if _number(epochs) and epochs > 0
            and abs(epochs * per_epoch - round(epochs * per_epoch)) > 1e-9]
