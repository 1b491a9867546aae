"""`mnist-opt serve`: a study's registered model over REST with MLflow's scoring server, started
as a new user would start it (the venv's bin/ not on PATH, no MLFLOW_TRACKING_URI), answering
with the model's own predictions; a request body of real test images; and one clear error when
there is nothing to serve."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hosts import stop_group

from conftest import free_port
from mnist_opt import data

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180  # s: the scoring server imports TensorFlow and loads the model first


def _main(*args: str) -> int:
    """The CLI in this process; its Ctrl-C handler is undone afterwards."""
    from mnist_opt.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(list(args))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mnist-opt: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory):
    """A 1-epoch MLP on 1,000 MNIST images in a fresh MLflow store, registered as `mlp_tpe`
    twice (version 1 crowned @champion as `retrain` crowns, version 2 the latest) and as
    `mlp_random` twice with no champion.

    Logged directly rather than by `retrain`, as tests/test_predict.py does: seconds."""
    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()
    import keras
    import mlflow

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.loop import train
    from mnist_opt.training.models import build_model

    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        (tmp / "mlruns").mkdir()
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.setenv("MNIST_OPT_STUDIES", str(ROOT / "studies"))
        ds = data.load("mnist")
        params = {"n_layers": 1, "units_l0": 32, "dropout_l0": 0.0, "batch_norm": False,
                  "activation": "relu", "optimizer": "adam", "learning_rate": 3e-3,
                  "batch_size": 64}
        x, y = data.stratified_subset(ds.x_train, ds.y_train, 1000, 0)
        keras.utils.set_random_seed(0)
        model = build_model(params)
        train(model, params, (data.to_float(x), y.astype("int64")), None, epochs=1)
        for name in ("mlp_tpe", "mlp_random"):
            with mlflow.start_run(experiment_id=tracking.open_experiment(name)):
                first = tracking.log_model(model, registered_name=name)
                tracking.log_model(model, registered_name=name)
            if name == "mlp_tpe":
                tracking.crown(name, str(first.registered_model_version), 0.9)
        yield {"tmp": tmp, "dataset": ds}


@pytest.fixture(scope="module")
def server(registered):
    """`mnist-opt serve mlp_tpe` as a subprocess on a free port, with neither the venv's bin/
    on PATH nor MLFLOW_TRACKING_URI set (the store is ./mlruns, as `make retrain` leaves it);
    killed, with the scoring server it started, afterwards."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in ("/usr/bin", "/bin") if Path(p) != venv_bin)
    assert shutil.which("uvicorn", path=path) is None  # else the test would prove nothing
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the package under test: this checkout's, also where another one is installed editable
    env.update(PATH=path, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    port, log = free_port(), registered["tmp"] / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mnist_opt", "serve", "mlp_tpe",
                                 "--port", str(port)], cwd=registered["tmp"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"mnist-opt serve on {url} did not answer (exit "
                                   f"{proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "port": port, "log": log}
    finally:
        stop_group(proc, grace=30)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _example(n: int, capsys) -> tuple[dict, str]:
    """`mnist-opt serve mlp_tpe --example n`: the JSON body it prints, and its note."""
    capsys.readouterr()
    assert _main("serve", "mlp_tpe", "--example", str(n)) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def _signature_shape(uri: str) -> tuple[int, ...]:
    import mlflow

    return tuple(mlflow.models.get_model_info(uri).signature.inputs.inputs[0].shape)


@pytest.mark.e2e
@pytest.mark.slow  # trains a model, starts the scoring server (TensorFlow) in a subprocess
def test_the_served_model_predicts_what_the_registered_model_predicts(server, registered, capsys):
    import mlflow

    body, _ = _example(3, capsys)
    status, answer = _post(server["url"], body)
    assert status == 200, answer
    served = np.asarray(answer["predictions"])
    assert served.shape == (3, 10)
    np.testing.assert_allclose(served.sum(axis=1), 1, atol=1e-4)  # softmax probabilities
    own = np.asarray(mlflow.pyfunc.load_model("models:/mlp_tpe@champion").predict(
        np.asarray(body["inputs"], dtype=np.float32)))
    assert (served.argmax(axis=1) == own.argmax(axis=1)).all()
    np.testing.assert_allclose(served, own, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_start_line_names_the_url_the_champion_and_the_signatures_layout(server):
    first = server["log"].read_text().splitlines()[0]
    assert f"http://127.0.0.1:{server['port']}/invocations" in first, first
    assert "models:/mlp_tpe@champion (version 1" in first, first
    shape = _signature_shape("models:/mlp_tpe@champion")  # read, not assumed
    layout = "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"
    assert f"input {layout} float32, output (N, 10)" in first, first


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(784,), (28, 28)], ids=["flat", "no-channel"])
def test_another_layout_is_refused_naming_the_one_the_signature_wants(server, registered, shape):
    x = data.to_float(registered["dataset"].x_test[:2]).reshape((2, *shape))
    status, answer = _post(server["url"], {"inputs": x.tolist()})
    assert status == 400, answer
    wanted = _signature_shape("models:/mlp_tpe@champion")
    assert f"does not match expected shape {wanted}" in answer["message"], answer


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_example_is_real_test_images_in_the_signatures_layout(registered, capsys):
    body, note = _example(2, capsys)
    x = np.asarray(body["inputs"], dtype=np.float32)
    assert x.shape == (2, *_signature_shape("models:/mlp_tpe@champion")[1:])
    ds = registered["dataset"]
    np.testing.assert_array_equal(x.reshape(2, 28, 28, 1), data.to_float(ds.x_test[:2]))
    assert f"labels {ds.y_test[0]}, {ds.y_test[1]}" in note, note


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_the_version_served_is_the_champion_else_the_latest_or_the_one_asked_for(registered):
    from mnist_opt.tracking import serving

    serving.open_store()
    assert serving.resolve("mlp_tpe").uri == "models:/mlp_tpe@champion"
    assert serving.resolve("mlp_tpe").version == "1"
    assert serving.resolve("mlp_random").uri == "models:/mlp_random/2"  # no champion: latest
    assert serving.resolve("mlp_tpe", version="2").uri == "models:/mlp_tpe/2"
    assert serving.resolve("mlp_tpe", alias="champion").version == "1"
    assert serving.resolve("mlp_tpe", version="latest").uri == "models:/mlp_tpe/2"


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
@pytest.mark.parametrize("flag,value,says", [("--version", "7", "has no version 7; its versions: 1, 2"),
                                             ("--alias", "prod", "has no alias @prod; its aliases: "
                                                                 "@champion (version 1)")])
def test_a_missing_version_or_alias_is_one_error(registered, capsys, flag, value, says):
    assert _main("serve", "mlp_tpe", flag, value) == 2
    out = capsys.readouterr()
    assert says in _one_error(out.err) and not out.out


@pytest.mark.e2e
def test_a_study_without_a_registered_model_says_to_retrain_it(stores, capsys):
    assert _main("serve", "mlp_hyperband") == 2
    out = capsys.readouterr()
    line = _one_error(out.err)
    assert "no registered model 'mlp_hyperband'" in line and stores["tracking"] in line, line
    assert "make retrain NAME=mlp_hyperband" in line and not out.out, line


@pytest.mark.e2e
def test_an_unknown_name_says_so_and_lists_the_studies(stores, capsys):
    assert _main("serve", "no_such_study", "--example", "1") == 2
    line = _one_error(capsys.readouterr().err)
    assert "no registered model 'no_such_study'" in line and "unknown study" in line, line
    assert "mlp_tpe" in line, line  # among the known studies


def test_no_tracking_store_here_is_an_error_that_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _main("serve", "mlp_tpe") == 2
    line = _one_error(capsys.readouterr().err)
    assert "no MLflow tracking store" in line and "MLFLOW_TRACKING_URI" in line, line
    assert list(tmp_path.iterdir()) == []
