"""``mnist-opt serve``: a study's registered model over REST with MLflow's scoring server, or
with ``--example N`` a request body of N real test images in the layout the model wants.

The server is ``mlflow models serve --env-manager local``: offline, no environment can be
built for the model, so it runs in this one. MLflow starts ``uvicorn`` from ``PATH``, which
a virtual environment used without activation (``.venv/bin/mnist-opt``) lacks: this
interpreter's ``bin/`` goes first on the server's ``PATH``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mnist_opt.errors import StudyFileError
from mnist_opt.study.config import UnknownStudyError, find_study

DEFAULT_PORT = 5001  # 5000 is the MLflow UI's (make mlflow-ui)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of images")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="study name: the registered model `retrain` made of it")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", metavar="V",
                       help="serve version V, or `latest` (default: @champion, else the latest version)")
    which.add_argument("--alias", metavar="A", help="serve the version alias @A points to")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 5000 is the MLflow UI's)")
    parser.add_argument("--example", type=_count, metavar="N",
                        help="print a request body, {\"inputs\": …} with the first N test images "
                             "in the model's input layout, and exit (serves nothing)")


def _study(name: str) -> tuple[str, str | None, str]:
    """The registered model's name, the study's dataset (None if unknown) and how to get a
    model registered."""
    try:
        cfg = find_study(name)
    except UnknownStudyError as exc:
        return name, None, f"{exc}; give a study you have retrained"
    except StudyFileError:  # an invalid file: its registered models can still be served
        return name, None, f"run `make retrain NAME={name}` first"
    return cfg.name, cfg.dataset, (f"run `make retrain NAME={name}` first (it registers the "
                                   f"study's best trial as model {cfg.name!r})")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a study's registered model over REST (MLflow's scoring server, POST /invocations):
    @champion, or --version/--alias; --example N prints a request body of N test images."""
    from mnist_opt.tracking import serving

    name, dataset, fix = _study(args.name)
    store = serving.open_store()
    served = serving.resolve(name, args.version, args.alias, fix)
    lay = serving.layout(served.uri)
    if args.example:
        if dataset is None:
            from mnist_opt.training.predict import model_dataset

            dataset = model_dataset(served.uri) or "mnist"
        body, labels = serving.request_body(lay, dataset, args.example)
        json.dump(body, sys.stdout)
        print()
        print(f"{args.example} {dataset} test images, labels {', '.join(map(str, labels))}; "
              f"{lay.describe()}; for {served.uri} (version {served.version})", file=sys.stderr)
        return 0
    url = f"http://{args.host}:{args.port}/invocations"
    print(f"serving {served.uri} (version {served.version}: {served.chosen}) at {url}; "
          f"{lay.describe()}; POST {{\"inputs\": …}} (`mnist-opt serve {args.name} --example 2` "
          "writes one)", flush=True)
    bindir = os.path.dirname(sys.executable)  # not resolved: a venv's python is a symlink
    env = {**os.environ, "PATH": os.pathsep.join(p for p in (bindir, os.environ.get("PATH")) if p),
           "MLFLOW_TRACKING_URI": store}
    if os.environ.get("MNIST_OPT_TF_LOGS") != "1":
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", served.uri,
               "--env-manager", "local", "-h", args.host, "-p", str(args.port)]
    sys.stderr.flush()
    os.execve(sys.executable, command, env)
    return 1  # not reached: execve replaces this process
