"""What users read about the parameter table: the JSON Schema of a study file (editors check
study files as they are typed) and the parameter list (``mnist-opt list --params``, README).

Both are generated from :data:`mnist_opt.study.params.PARAMS`, never written by hand.
"""
from __future__ import annotations

from typing import Any

from mnist_opt.study.config import StudyConfig
from mnist_opt.study.params import FAMILIES, PARAMS, TABLE_VERSION, Param

START, END = "<!-- params:start -->", "<!-- params:end -->"  # the README's generated section


def _value_schema(p: Param) -> dict[str, Any]:
    if p.kind == "bool":
        return {"type": "boolean"}
    if p.kind == "choice":
        return {"enum": list(p.choices)}
    return {"type": "integer" if p.kind == "int" else "number", "minimum": p.low, "maximum": p.high}


def _spec_schema(p: Param, fixed: bool) -> dict[str, Any]:
    """One spec of ``p``: a value, ``{choices: [...]}``, or (numbers) ``{low, high, …}``."""
    value = _value_schema(p)
    if fixed:
        return value
    specs = [value, {"type": "object", "additionalProperties": False, "required": ["choices"],
                     "properties": {"choices": {"type": "array", "items": value, "minItems": 1}}}]
    if p.kind in ("int", "float"):
        number = {"type": "integer" if p.kind == "int" else "number"}
        specs.append({"type": "object", "additionalProperties": False, "required": ["low", "high"],
                      "properties": {"low": {**value}, "high": {**value}, "log": {"type": "boolean"},
                                     "step": {**number, "exclusiveMinimum": 0},
                                     "grid": {"type": "array", "items": value, "minItems": 1}}})
    return {"anyOf": specs}


def _param_schema(entries: list[Param], fixed: bool) -> dict[str, Any]:
    """A name's schema; a name two families use differently (dropout) allows either."""
    options = []
    for p in entries:
        one = _spec_schema(p, fixed)
        options.append({"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
                       if p.per_layer else one)
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "description": "; ".join(f"{'/'.join(p.families)}: {p.help} — {p.allowed}, "
                                               f"default {p.default!r}" for p in entries)}


def _params_schema(fixed: bool) -> dict[str, Any]:
    names: dict[str, list[Param]] = {}
    for p in PARAMS:
        names.setdefault(p.name, []).append(p)
    return {"type": "object", "additionalProperties": False,
            "properties": {name: _param_schema(entries, fixed) for name, entries in names.items()}}


def json_schema() -> dict[str, Any]:
    """The study file's JSON Schema: pydantic's for the sections, the table's for the space
    and the baseline's params (a name must be one of the model's; which model's is checked
    on load, not by the schema)."""
    schema = StudyConfig.model_json_schema()
    for key in ("name", "path", "digest"):
        schema["properties"].pop(key, None)
    schema["required"] = [k for k in schema.get("required", []) if k not in ("name", "path", "digest")]
    schema["properties"]["space"] = {**_params_schema(fixed=False), "title": "Space"}
    baseline = schema["$defs"]["Baseline"]["properties"]
    baseline["params"] = {**_params_schema(fixed=True), "title": "Params"}
    schema["title"] = f"mnist_opt study file (parameter table v{TABLE_VERSION})"
    return schema


def rows() -> list[dict[str, Any]]:
    """One row per parameter: what ``list --params`` prints and the README shows."""
    out = []
    for p in PARAMS:
        when = f"{p.when[0]} = {' or '.join(p.when[1])}" if p.when else ""
        out.append({"name": p.name, "model": ", ".join(p.families), "kind": p.kind,
                    "allowed": p.allowed, "default": p.default,
                    "per_layer": "yes" if p.per_layer else "", "exists when": when, "what": p.help})
    return out


def markdown() -> str:
    """The parameter table as Markdown (README section between the params markers)."""
    head = list(rows()[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows():
        cells = [f"`{row[k]}`" if k == "name" else str(row[k]).replace("|", "\\|") for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    per_layer = ", ".join(f"`{p.name}_{f.suffix}{{i}}`" for m, f in FAMILIES.items()
                          for p in PARAMS if p.per_layer and m in p.families)
    return (f"Parameter table version {TABLE_VERSION} (part of every study's digest). "
            f"Parameters of `training` exist in every study; per-layer ones become {per_layer} "
            f"in a trial.\n\n" + "\n".join(lines) + "\n")
