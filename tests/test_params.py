"""The parameter table: in step with Keras and the optimizer factory; study files generated
from it (valid and invalid) are accepted or refused as it says; every value it allows builds
with the real builders and trains one batch; `check`, the JSON Schema and the README agree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import keras
import numpy as np
import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_opt.study import docs
from mnist_opt.study.config import InvalidStudyFile, StudyConfig, load_config
from mnist_opt.study.params import (ACTIVATIONS, EXCLUDED_ACTIVATIONS, FAMILIES, OPTIMIZERS,
                                    PARAMS, TRAINING, Param, params_of, table)
from mnist_opt.study.space import suggest_params
from mnist_opt.textblocks import between

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
# The file a new user wrote (issue: "only one draw in eight is valid", all trials failed).
BAD = """\
description: a copy of mlp_random with three values the builders do not take
dataset: mnist
model: mlp
search: {sampler: random, pruner: hyperband, n_trials: 6}
training: {max_epochs: 2}
space:
  n_layers: {low: 1, high: 3}
  units: {low: 64, high: 1024, log: true}
  activation: {choices: [relu, swishy]}
  optimizer: {choices: [adam, adagrad]}
  batch_size: {choices: [0, 64]}
"""


def _write(tmp_path: Path, doc: dict | str, name: str = "gen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def _doc(model: str, space: dict) -> dict:
    return {"dataset": "mnist", "model": model, "search": {"sampler": "random", "n_trials": 2},
            "training": {"max_epochs": 1}, "space": space}


def _accepted(cfg: StudyConfig, params: dict) -> None:
    """Every value of a trial's params is one the table allows (units_l2 → units)."""
    params_table = table(cfg.model)
    for name, value in params.items():
        base = name.rsplit("_", 1)[0] if name not in params_table else name
        assert params_table[base].accepts(value), (name, value)


# --- the table is in step with Keras and the factory ------------------------------------------

def test_activations_are_every_name_keras_knows_less_the_excluded_ones():
    public = {n for n in dir(keras.activations) if not n.startswith("_")
              and n not in ("get", "serialize", "deserialize")}
    assert set(ACTIVATIONS) | set(EXCLUDED_ACTIVATIONS) == public
    assert not set(ACTIVATIONS) & set(EXCLUDED_ACTIVATIONS)
    for name in ACTIVATIONS:
        assert callable(keras.activations.get(name))


def test_optimizer_choices_are_what_the_factory_builds():
    from mnist_opt.training.loop import OPTIMIZERS as BUILT

    assert tuple(BUILT) == OPTIMIZERS == table("mlp")["optimizer"].choices


def test_every_condition_names_an_earlier_choice_with_those_values():
    for model in FAMILIES:
        order = [p.name for p in params_of(model)]
        for p in params_of(model):
            if p.when:
                source = table(model)[p.when[0]]
                assert order.index(source.name) < order.index(p.name)
                assert set(p.when[1]) <= set(source.choices)


# The table's content for each TABLE_VERSION. A changed entry fails this test: if the change
# alters what an existing study file means (a default, a bound, a condition), raise
# TABLE_VERSION so studies begun under the old meaning are refused as changed; either way,
# record the new fingerprint here.
# v2 grew the recipes (issue 14) without a new version: new choices (sgdw, rmsprop, one_cycle, cosine)
# with parameters only they switch on, and label_smoothing whose default 0 is the old loss.
FINGERPRINTS = {2: "c69b0af1253b9d15"}


def test_a_changed_table_comes_with_a_decision_about_its_version():
    import hashlib

    from mnist_opt.study.params import TABLE_VERSION

    assert hashlib.sha256(repr(PARAMS).encode()).hexdigest()[:16] == FINGERPRINTS[TABLE_VERSION]


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"{p.families[0]}-{p.name}")
def test_each_default_is_allowed(p: Param):
    assert p.accepts(p.default)


# --- every value the table allows builds and trains -------------------------------------------

def _coverage_cases() -> list[tuple[str, str, object]]:
    """(model, parameter, value): every declared choice and both bounds of every range.

    A parameter both families build the same way (training, activation) is covered once."""
    cases = []
    for model in FAMILIES:
        for p in params_of(model):
            if model != "mlp" and (p.name == "activation" or TRAINING in p.families):
                continue
            values = (list(p.choices) if p.kind == "choice" else [False, True] if p.kind == "bool"
                      else [p.low if p.kind == "float" else int(p.low),
                            p.high if p.kind == "float" else int(p.high)])
            cases += [(model, p.name, v) for v in values]
    return cases


COVERAGE = _coverage_cases()


def _train_one_batch(cfg: StudyConfig, params: dict) -> None:
    from mnist_opt.training.loop import fresh_model, train

    model = fresh_model(params, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((8, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    history = train(model, params, (x, y), None, epochs=1)
    assert len(history.history["loss"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("model,name,value", COVERAGE, ids=[f"{m}-{n}-{v}" for m, n, v in COVERAGE])
def test_every_allowed_value_builds_and_trains_one_batch(tmp_path, model, name, value):
    space = {name: value}
    when = table(model)[name].when
    if when:  # make the parameter exist
        space[when[0]] = when[1][0]
    cfg = load_config(_write(tmp_path, _doc(model, space)))
    params = suggest_params(optuna.trial.FixedTrial({}), cfg)
    _accepted(cfg, params)
    assert params[name if not table(model)[name].per_layer
                  else f"{name}_{FAMILIES[model].suffix}0"] == value
    _train_one_batch(cfg, params)


def test_coverage_holds_every_choice_and_both_bounds():
    for p in PARAMS:
        models = [f for f in p.families if f in FAMILIES] or ["mlp"]
        covered = {v for m, n, v in COVERAGE if m in models and n == p.name}
        wanted = ({True, False} if p.kind == "bool" else set(p.choices) if p.kind == "choice"
                  else {p.low, p.high})
        assert covered == wanted, p.name


# --- generated study files ------------------------------------------------------------------

# Sizes small enough to train one batch quickly; the bounds themselves are covered above.
SMALL = {"n_layers": 3, "units": 64, "n_blocks": 3, "filters": 16, "dense_units": 64,
         "convs_per_block": 2, "kernel_size": 5}


def _value(p: Param, small: bool) -> st.SearchStrategy:
    if p.kind == "bool":
        return st.booleans()
    if p.kind == "choice":
        return st.sampled_from(p.choices)
    high = min(p.high, SMALL.get(p.name, p.high)) if small else p.high
    if p.kind == "int":
        return st.integers(int(p.low), int(high))
    return st.floats(p.low, high, allow_nan=False)


def _spec(p: Param, small: bool) -> st.SearchStrategy:
    value = _value(p, small)
    choices = st.lists(value, min_size=1, max_size=3, unique=True).map(lambda v: {"choices": v})
    specs = [value, choices]
    if p.kind in ("int", "float"):
        specs.append(st.tuples(value, value, st.booleans()).map(
            lambda t: {"low": min(t[:2]), "high": max(t[:2]), "log": t[2] and min(t[:2]) > 0}))
    return st.one_of(*specs)


@st.composite
def valid_docs(draw, small: bool = False) -> dict:
    """A study document whose every value the table allows: random parameters, each fixed,
    a choice or a range; per-layer lists no longer than the depth; conditions that hold."""
    model = draw(st.sampled_from(sorted(FAMILIES)))
    params = list(params_of(model))
    depth = params[0]
    max_depth = draw(_value(depth, small))
    space: dict = {depth.name: {"low": int(depth.low), "high": max_depth}}
    reachable: dict[str, list] = {}  # a source's choices that the drawn conditions need
    for p in params[1:]:
        if not draw(st.booleans()):
            continue
        if p.per_layer and draw(st.booleans()):
            space[p.name] = draw(st.lists(_spec(p, small), min_size=1, max_size=max_depth))
        else:
            space[p.name] = draw(_spec(p, small))
        if p.when:  # make the condition reachable, beside those of the source's other dependents
            needed = reachable.setdefault(p.when[0], [])
            needed += [] if p.when[1][0] in needed else [p.when[1][0]]
            space[p.when[0]] = {"choices": list(needed)}
    return _doc(model, space)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=valid_docs())
def test_generated_valid_files_load_and_every_trial_is_allowed(tmp_path, doc):
    cfg = load_config(_write(tmp_path, doc))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        _accepted(cfg, suggest_params(study.ask(), cfg))


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=valid_docs(small=True), seed=st.integers(0, 10**6))
def test_generated_valid_files_build_and_train_one_batch(tmp_path, doc, seed):
    cfg = load_config(_write(tmp_path, doc))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    _train_one_batch(cfg, suggest_params(study.ask(), cfg))


def _breakages(p: Param) -> list:
    """Values of ``p`` the builders do not take."""
    if p.kind == "bool":
        return ["yes", 1]
    if p.kind == "choice":
        return [f"{p.choices[0]}x", 3]
    below = p.low - 1 if p.kind == "int" else p.low - 0.5
    return [below, p.high * 2 + 1, "many", *([2.5] if p.kind == "int" else [])]


@st.composite
def invalid_docs(draw) -> tuple[dict, str]:
    """A valid document with one thing broken, and the key path the error must name."""
    doc = draw(valid_docs())
    model, space = doc["model"], doc["space"]
    p = draw(st.sampled_from(list(params_of(model))))
    how = draw(st.sampled_from(["value", "choice", "range", "unknown", "list"]))
    space.pop(p.name, None)
    bad = draw(st.sampled_from(_breakages(p)))
    if how == "value":
        space[p.name] = bad
    elif how == "choice":
        space[p.name] = {"choices": [p.default, bad]}
    elif how == "range" and p.kind in ("int", "float") and not isinstance(bad, str):
        space[p.name] = {"low": min(p.default, bad), "high": max(p.default, bad)}
    elif how == "list" and not p.per_layer:
        space[p.name] = [p.default, p.default]
    elif how == "list":  # longer than the depth allows
        depth = FAMILIES[model].depth
        space[depth] = 1
        space[p.name] = [p.default, p.default]
    else:
        space[f"{p.name}x"] = p.default
        return doc, f"space.{p.name}x"
    if p.when:
        space[p.when[0]] = {"choices": [p.when[1][0]]}
    return doc, f"space.{p.name}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=invalid_docs())
def test_generated_invalid_files_are_refused_naming_the_key(tmp_path, case):
    doc, key = case
    path = _write(tmp_path, doc)
    with pytest.raises(InvalidStudyFile) as err:
        load_config(path)
    assert f"{path}: {key}" in str(err.value)
    assert any(p.path == key or p.path.startswith((f"{key}.", f"{key}[")) for p in err.value.problems)


# --- the bad file of the issue ------------------------------------------------------------------

def test_the_bad_file_is_refused_naming_all_three_keys(tmp_path):
    with pytest.raises(InvalidStudyFile) as err:
        load_config(_write(tmp_path, BAD, "mlp_bad.yaml"))
    msg = str(err.value)
    assert "space.activation.choices[1]: 'swishy' is not allowed (did you mean 'swish'?)" in msg
    assert "space.optimizer.choices[1]: 'adagrad' is not allowed; allowed: adam, sgd, adamw, sgdw, rmsprop" in msg
    assert "space.batch_size.choices[0]: 0 is not allowed; allowed: an integer in [1, 65536]" in msg
    assert len(err.value.problems) == 3


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_opt", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def test_study_on_the_bad_file_exits_2_before_creating_anything(stores, tmp_path):
    path = _write(tmp_path, BAD, "mlp_bad.yaml")
    proc = _cli(tmp_path, "study", str(path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert sum("mnist-opt: error:" in line for line in proc.stderr.splitlines()) == 1
    for key in ("space.activation", "space.optimizer", "space.batch_size"):
        assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists()  # no study
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no MLflow run


def test_check_passes_the_shipped_studies_and_refuses_the_bad_one(tmp_path):
    proc = _cli(ROOT, "check")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("ok ") == len(list(STUDIES.glob("*.yaml")))
    bad = _write(tmp_path, BAD, "mlp_bad.yaml")
    proc = _cli(ROOT, "check", str(bad), "mlp_tpe", "-f", "json")
    assert proc.returncode == 2
    results = json.loads(proc.stdout)
    assert [r["ok"] for r in results] == [False, True]
    assert {p["path"] for p in results[0]["problems"]} == {
        "space.activation.choices[1]", "space.optimizer.choices[1]", "space.batch_size.choices[0]"}


def test_check_unknown_name_lists_the_known_studies():
    proc = _cli(ROOT, "check", "mlp_tpx")
    assert proc.returncode == 2
    assert "mlp_tpe" in proc.stdout and "INVALID" in proc.stdout


def test_baseline_params_are_checked_against_the_table(tmp_path):
    doc = yaml.safe_load((STUDIES / "mlp_tpe.yaml").read_text())
    doc["baseline"]["params"]["activation"] = "swishy"
    doc["baseline"]["params"]["units"] = {"low": 1, "high": 2}
    with pytest.raises(InvalidStudyFile) as err:
        load_config(_write(tmp_path, doc))
    paths = {p.path for p in err.value.problems}
    assert paths == {"baseline.params.activation", "baseline.params.units"}


def test_a_condition_that_can_never_hold_is_refused(tmp_path):
    doc = _doc("mlp", {"optimizer": "adam", "weight_decay": {"low": 1e-5, "high": 1e-3}})
    with pytest.raises(InvalidStudyFile, match="weight_decay exists only when optimizer is adamw"):
        load_config(_write(tmp_path, doc))


def test_search_settings_that_do_not_go_together_are_reported_with_the_rest(tmp_path):
    doc = _doc("mlp", {"activation": "swishy"})
    doc["search"].update(second_objective="n_params", pruner="hyperband", metric="val_loss")
    with pytest.raises(InvalidStudyFile) as err:
        load_config(_write(tmp_path, doc))
    assert {p.path for p in err.value.problems} == {"search.pruner", "search.direction",
                                                     "space.activation"}
    assert "set direction: minimize" in str(err.value)


def test_a_grid_study_needs_a_grid_for_every_searched_range(tmp_path):
    doc = _doc("mlp", {"n_layers": 1, "units": {"choices": [32, 64]},
                       "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}})
    doc["search"]["sampler"] = "grid"
    with pytest.raises(InvalidStudyFile, match="space.learning_rate: the grid sampler needs"):
        load_config(_write(tmp_path, doc))
    doc["space"]["learning_rate"]["grid"] = [1e-4, 1e-3]
    assert load_config(_write(tmp_path, doc)).search.sampler == "grid"


# --- the JSON Schema and the README ---------------------------------------------------------------

def test_json_schema_accepts_the_shipped_studies_and_flags_the_bad_values():
    schema = docs.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in STUDIES.glob("*.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    errors = list(validator.iter_errors(yaml.safe_load(BAD)))
    flagged = {tuple(e.absolute_path)[:2] for e in errors}
    assert flagged == {("space", "activation"), ("space", "optimizer"), ("space", "batch_size")}


def test_check_schema_prints_the_schema():
    proc = _cli(ROOT, "check", "--schema")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["properties"]["space"]["properties"]["activation"]


def test_readme_parameter_table_is_generated_from_the_table():
    assert between(ROOT / "README.md", docs.START, docs.END) == docs.markdown(), \
        "README's parameter table is stale: run `make docs`"
