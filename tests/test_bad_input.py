"""Bad input: one clear error, exit status 2, and nothing already stored changes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mnist_opt.study.config import StudyConfig, load_config
from mnist_opt.study.params import table
from mnist_opt.study.space import suggest_params
from mnist_opt.errors import StudyFileError

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "studies" / "mlp_tpe.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
KEYS = ["dataset", "model", "data", "search", "training", "space", "description",
        "data.val_fraction", "data.seed", "data.train_subset", "search.sampler", "search.pruner",
        "search.n_trials", "search.timeout", "search.metric", "training.max_epochs",
        "training.backend",
        "space.n_layers", "space.units", "space.dropout", "space.learning_rate",
        "space.optimizer", "space.bogus", "space.units.low", "space.units.log"]


def _mutate(doc: dict, key: str, value) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(doc))  # deep copy
    *parents, last = key.split(".")
    node = doc
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    return doc


def _load(tmp: Path, text: str):
    path = tmp / "prop.yaml"
    path.write_text(text)
    try:
        return load_config(path)
    except StudyFileError as exc:
        assert str(path) in str(exc)  # the one error always names the file
        return exc


def _valid_trials(cfg: StudyConfig) -> None:
    """A file that loads must only ever give trials the builders accept."""
    params_table = table(cfg.model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        for name, value in suggest_params(study.ask(), cfg).items():
            base = name if name in params_table else name.rsplit("_", 1)[0]
            assert params_table[base].accepts(value), (name, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=values)
def test_any_mutated_study_file_is_usable_or_refused_at_that_key(tmp_path, key, value):
    text = yaml.safe_dump(_mutate(BASE, key, value), allow_unicode=True)
    result = _load(tmp_path, text)
    if isinstance(result, StudyConfig):
        _valid_trials(result)
    else:  # refused: the message names the mutated key (space.units of space.units.low), or
        # a relation the mutation broke names it (the grid sampler, a condition's source)
        msg = str(result)
        where = ".".join(key.split(".")[:2]) if key.startswith("space.") else key
        name = key.split(".")[-1] if key.startswith("search.") else key.split(".")[1:2]
        relation = (key == "search.sampler" and "the grid sampler needs" in msg) or \
            (key.startswith("space.") and f"when {key.split('.')[1]} is" in msg)
        assert f": {where}" in msg or relation, (key, name, msg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
@example(text="?")  # a mapping with a None key: once a TypeError
@example(text="1: 2\n")
def test_any_text_is_refused_with_the_one_error(tmp_path, text):
    # 200 random characters cannot hold dataset, model and space: never a study
    assert isinstance(_load(tmp_path, text), StudyFileError)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=values)
@example(doc={"function-": None})  # a key shaped like pydantic's validator step: once IndexError
def test_any_yaml_document_is_refused_with_the_one_error(tmp_path, doc):
    assert isinstance(_load(tmp_path, yaml.safe_dump(doc, allow_unicode=True)), StudyFileError)


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "mnist_opt", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


def _existing_study(storage: str) -> list:
    """A study with one recorded trial, to check that a failing command leaves it untouched."""
    study = optuna.create_study(study_name="mlp_tpe", storage=storage, direction="maximize")
    study.add_trial(optuna.create_trial(params={}, distributions={}, value=0.5))
    return [(t.number, t.state, t.value) for t in study.trials]


def _written(folder: Path, tracking: str) -> tuple:
    """What a command could have written: the files under ``folder`` (stores, a path read
    from a bad URL) and the MLflow store's experiments and runs. Not the empty ``.lock`` files
    that serialise opening an existing SQLite store: they hold no record."""
    from mlflow.tracking import MlflowClient

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.relative_to(folder).parts[0] != "data"  # the test's own copy
                   and not (p.suffix == ".lock" and p.with_suffix("").exists()))
    if not Path(tracking.removeprefix("sqlite:///")).exists():
        return files, None
    client = MlflowClient(tracking)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    return files, sorted(e.name for e in exps), sorted(r.info.run_id for r in runs)


@pytest.mark.slow  # each case starts mnist-opt, which loads TensorFlow first: 5-15 s here
@pytest.mark.parametrize("case", ["corrupt_data", "missing_data", "bad_storage_url",
                                  "unreachable_storage", "unwritable_mlruns"])
def test_bad_input_exits_2_with_one_error_and_changes_nothing(stores, tmp_path, case):
    before = _existing_study(stores["storage"])
    env, args = {}, ["study", "mlp_tpe", "--n-trials", "2", "--max-epochs", "1",
                     "--train-subset", "1000"]
    expect = ""
    if case in ("corrupt_data", "missing_data"):
        import os

        data = tmp_path / "data" / "mnist"
        shutil.copytree(Path(os.environ["MNIST_OPT_DATA"]) / "mnist", data)
        target = data / "train-labels-idx1-ubyte.gz"
        if case == "corrupt_data":
            target.write_bytes(target.read_bytes()[:1000])  # truncated
            expect = "checksum mismatch"
        else:
            target.unlink()
            expect = "train-labels-idx1-ubyte.gz is missing"
        env = {"MNIST_OPT_DATA": str(tmp_path / "data")}
        # no network in tests: the download must fail fast and name the file
        env["MNIST_OPT_MIRRORS"] = "http://127.0.0.1:9/"
    elif case == "bad_storage_url":
        args += ["--storage", "postgres:/nonsense"]
        expect = "unsupported storage URL"
    elif case == "unreachable_storage":
        args += ["--storage", "postgresql://nobody@127.0.0.1:9/none"]
        expect = "cannot open Optuna storage"
    else:
        (tmp_path / "blocker").write_text("a file where a directory should be")
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}"}
        expect = "cannot open the MLflow tracking store"
    written = _written(tmp_path, stores["tracking"])
    proc = _cli(tmp_path, *args, **env)
    after = _written(tmp_path, stores["tracking"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert sum("mnist-opt: error:" in line for line in proc.stderr.splitlines()) == 1
    # the default storage's study (the one the data and MLflow cases would have continued)
    study = optuna.load_study(study_name="mlp_tpe", storage=stores["storage"])
    assert [(t.number, t.state, t.value) for t in study.trials] == before
    # and nothing else: the storage-URL cases never reach that storage, so what would show
    # there is a tracking store, experiment, run or file written before the URL was checked
    assert after == written


def test_a_sqlite_storage_in_a_folder_that_does_not_exist_yet_is_created(tmp_path):
    from mnist_opt.tracking.storage import make_storage

    url = f"sqlite:///{tmp_path / 'new' / 'deeper' / 'optuna.db'}"
    study = optuna.create_study(study_name="fresh", storage=make_storage(url))
    assert study.study_name == "fresh" and (tmp_path / "new" / "deeper" / "optuna.db").exists()
