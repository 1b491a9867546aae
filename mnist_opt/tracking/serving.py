"""The registered model to serve, the input layout its signature wants, and a request body.

``retrain`` registers each retrained model as a new version of the model named after the
study and gives the best one so far the alias ``@champion`` (``runs.crown``). Serving takes
that one unless told a version or another alias; without a champion, the latest version.
The layout is read from the model's signature, which MLflow's scoring server enforces: it
refuses an input of any other shape.

Imports MLflow but neither TensorFlow nor Keras: ``mnist-opt serve`` answers, or refuses, in
a second or two; the scoring server loads TensorFlow itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from mnist_opt.errors import ServeError
from mnist_opt.tracking.urls import DEFAULT_DIR, tracking_uri

CHAMPION = "champion"  # the registered model's alias: its best retrained version so far
MISSING = "RESOURCE_DOES_NOT_EXIST"


def open_store() -> str:
    """Point MLflow at the tracking store and return its URI; refuse, rather than create an
    empty default store, when there is none in this directory."""
    default = DEFAULT_DIR / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not default.exists():
        raise ServeError(f"no MLflow tracking store at {default.resolve()}: run in the directory "
                         "where `make retrain` wrote mlruns/, or set MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


@dataclass(frozen=True)
class Served:
    """One version of a registered model, and how it was chosen."""
    name: str
    version: str
    uri: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    chosen: str  # for the start line: "alias @champion", "--version 3", …


def _versions(client: mlflow.MlflowClient, name: str) -> list[str]:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found), key=int)


def _store_error(store: str, exc: Exception) -> ServeError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ServeError(f"cannot read the model registry of the MLflow tracking store {store}: "
                      f"{first}; check MLFLOW_TRACKING_URI")


def resolve(name: str, version: str | None = None, alias: str | None = None,
            fix: str = "") -> Served:
    """The version of registered model ``name`` to serve: ``version``, or the one ``alias``
    points to, or ``@champion``, or the latest. A ServeError says what is missing, what the
    store holds instead, and ``fix`` (how to register one) when there is no model at all."""
    client, store = mlflow.MlflowClient(), mlflow.get_tracking_uri()
    try:
        model = client.get_registered_model(name)
        versions = _versions(client, name)
    except MlflowException as exc:
        if exc.error_code != MISSING:
            raise _store_error(store, exc) from None
        try:
            others = sorted(m.name for m in client.search_registered_models())
        except Exception:  # noqa: BLE001 - the first error is the one to report
            others = []
        held = f"it holds {', '.join(others)}" if others else "it holds none"
        raise ServeError(f"no registered model {name!r} in the MLflow tracking store {store} "
                         f"({held}): {fix}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and MLflow raise many kinds
        raise _store_error(store, exc) from None
    if not versions:
        raise ServeError(f"registered model {name!r} has no versions left: {fix}")
    aliases = {a: str(v) for a, v in model.aliases.items()}
    if str(version).lower() == "latest":  # as models:/NAME/latest says it
        return Served(name, versions[-1], f"models:/{name}/{versions[-1]}", "--version latest")
    if version is not None:
        if str(version) not in versions:
            raise ServeError(f"registered model {name!r} has no version {version}; its versions: "
                             f"{', '.join(versions)}")
        return Served(name, str(version), f"models:/{name}/{version}", f"--version {version}")
    if alias is not None:
        if alias not in aliases:
            held = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items()))
            raise ServeError(f"registered model {name!r} has no alias @{alias}; its aliases: "
                             f"{held or 'none'}")
        return Served(name, aliases[alias], f"models:/{name}@{alias}", f"--alias {alias}")
    if CHAMPION in aliases:
        return Served(name, aliases[CHAMPION], f"models:/{name}@{CHAMPION}",
                      f"@{CHAMPION}, the best test accuracy retrained so far")
    return Served(name, versions[-1], f"models:/{name}/{versions[-1]}",
                  f"the latest version; no @{CHAMPION} alias")


@dataclass(frozen=True)
class Layout:
    """The input (and output) tensor shapes of a model's signature; -1 is the batch."""
    shape: tuple[int, ...] | None  # None: no tensor signature, so MLflow checks nothing
    dtype: str | None
    outputs: tuple[int, ...] | None

    @staticmethod
    def _shape(shape: tuple[int, ...]) -> str:
        return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"

    def describe(self) -> str:
        """``input (N, 28, 28, 1) float32, output (N, 10)``, or why it cannot say."""
        if self.shape is None:
            return "input layout not recorded (the model has no tensor signature)"
        out = f", output {self._shape(self.outputs)}" if self.outputs else ""
        return f"input {self._shape(self.shape)} {self.dtype}{out}"


def _tensor(schema) -> tuple[tuple[int, ...], str] | None:
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    spec = schema.inputs[0]
    return tuple(int(d) for d in spec.shape), np.dtype(spec.type).name


def layout(uri: str) -> Layout:
    """What the model at ``uri`` takes, as its MLflow signature records it."""
    try:
        signature = mlflow.models.get_model_info(uri).signature
    except Exception as exc:  # noqa: BLE001 - a missing artifact, an unreachable store
        raise ServeError(f"cannot read the model {uri}: {str(exc).splitlines()[0]}") from None
    inputs = _tensor(signature.inputs) if signature else None
    outputs = _tensor(signature.outputs) if signature else None
    return Layout(*(inputs or (None, None)), outputs[0] if outputs else None)


def request_body(lay: Layout, dataset: str, n: int) -> tuple[dict, list[int]]:
    """``{"inputs": …}`` for the scoring server: the first ``n`` test images of ``dataset``
    (pixels scaled to [0, 1] as in training) in the layout ``lay``; and their labels.

    Real images, so a prediction can be checked by eye; the test split, because no model
    chose anything by it (retrain only scores on it)."""
    from mnist_opt import data  # scikit-learn comes with it: only here

    ds = data.load(dataset)
    if n > len(ds.y_test):
        raise ServeError(f"--example {n}: the {dataset} test set has {len(ds.y_test)} images")
    x = data.to_float(ds.x_test[:n])
    if lay.shape is not None:
        try:
            x = x.reshape((n, *lay.shape[1:])).astype(lay.dtype)
        except (TypeError, ValueError):
            raise ServeError(f"the model wants {lay.describe()}, which {dataset}'s 28×28 images "
                             "do not fill: it was not trained on them") from None
    return {"inputs": x.tolist()}, [int(label) for label in ds.y_test[:n]]
