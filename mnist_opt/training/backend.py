"""Which Keras backend trains a study: ``training.backend: auto | tensorflow | jax``.

No backend is fastest for every model: on a CPU, JAX can run a small MLP's later epochs
faster than TensorFlow while compiling its first epoch slower, and a CNN's epochs much
slower; how much depends on the machine. ``auto`` therefore reads a calibration, made by
``mnist-opt calibrate`` (:mod:`mnist_opt.training.calibrate`) and stored in the per-user
cache: each model family's first-epoch and later-epoch seconds under each backend. It picks
the backend with the shorter expected trial (first epoch + later epochs × the epochs a
trial of this study is expected to train); without a calibration it is TensorFlow, and says
so. A calibration never runs inside a study.

Keras fixes its backend when it is first imported, so the choice goes into
``KERAS_BACKEND`` before anything imports Keras (:func:`apply`: the CLI does it right after
reading the study file; worker processes inherit it). This module imports no Keras itself.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

from mnist_opt.data import TRAIN_IMAGES, cache_root
from mnist_opt.errors import MnistOptError
from mnist_opt.study.config import BACKENDS, StudyConfig

DEFAULT = "tensorflow"  # without a calibration: what every study ran on before `auto`


def calibration_path() -> Path:
    return cache_root() / "calibration.json"


def jax_cache_dir() -> Path:
    """JAX's persistent compilation cache: a later process skips compiling the same model."""
    return cache_root() / "jax"


def load_calibration(path: Path | None = None) -> dict[str, Any] | None:
    """The stored calibration, None when there is none; a damaged file is an error that
    names it and how to fix it."""
    path = path or calibration_path()
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        for family in doc["families"].values():
            for timing in family.values():
                float(timing["first_s"]), float(timing["later_s"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MnistOptError(f"{path} is not a calibration written by `mnist-opt calibrate` "
                            f"({type(exc).__name__}: {exc}): delete it or run "
                            "`mnist-opt calibrate` again") from exc
    return doc


def expected_epochs(cfg: StudyConfig) -> float:
    """Epochs a trial of ``cfg`` is expected to train: ``max_epochs`` unless Hyperband
    prunes. Under Hyperband, the mean over its brackets of successive halving's expectation:
    in bracket b a trial trains to ``min_resource × η^b`` epochs and goes on to each next
    rung (× η) with probability 1/η, up to ``max_epochs``."""
    top = cfg.training.max_epochs
    s = cfg.search
    if s.pruner != "hyperband":
        return float(top)
    eta, per_bracket = s.reduction_factor, []
    for bracket in range(cfg.hyperband_brackets):
        rungs = []
        rung = s.min_resource * eta ** bracket
        while rung < top:
            rungs.append(rung)
            rung *= eta
        ends = [*rungs, top]
        per_bracket.append(sum((end - start) / eta ** k
                               for k, (start, end) in enumerate(zip([0, *rungs], ends))))
    return sum(per_bracket) / len(per_bracket)


def train_images(cfg: StudyConfig) -> int:
    """How many images a trial of ``cfg`` trains on per epoch (its split's training part)."""
    return cfg.trial_images(TRAIN_IMAGES)


def trial_seconds(timing: dict[str, float], epochs: float, images: int | None = None) -> float:
    """A trial's expected time: the first epoch's excess (tracing or compiling), then
    ``epochs`` epochs, each scaled from the calibration's training images to ``images``."""
    scale = images / timing["n_train"] if images and timing.get("n_train") else 1.0
    setup = max(0.0, timing["first_s"] - timing["later_s"])
    return setup + epochs * timing["later_s"] * scale


def choose(cfg: StudyConfig, calibration: dict[str, Any] | None = None) -> tuple[str, str]:
    """The backend for ``cfg``, and why (a line for the study's start line)."""
    wanted = cfg.training.backend
    if wanted != "auto":
        return wanted, f"{wanted} (training.backend)"
    calibration = calibration if calibration is not None else load_calibration()
    timings = (calibration or {}).get("families", {}).get(cfg.model, {})
    measured = {b: timings[b] for b in BACKENDS if b in timings}
    if len(measured) < 2:
        return DEFAULT, (f"{DEFAULT} (auto: no calibration of {cfg.model} models under "
                         f"{' and '.join(BACKENDS)} in {calibration_path()}; "
                         "`mnist-opt calibrate` measures them)")
    epochs = expected_epochs(cfg)
    seconds = {b: trial_seconds(t, epochs, train_images(cfg)) for b, t in measured.items()}
    best = min(BACKENDS, key=seconds.__getitem__)
    shown = ", ".join(f"{b} {seconds[b]:.1f} s" for b in BACKENDS)
    return best, (f"{best} (auto: a {epochs:.1f}-epoch {cfg.model} trial, calibrated: {shown})")


def apply(backend: str) -> None:
    """Make ``backend`` the one Keras imports (this process and the processes it starts);
    refused when Keras is already imported with another one."""
    if backend not in BACKENDS:
        raise MnistOptError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        loaded = sys.modules["keras"].backend.backend()
        if loaded != backend:
            raise MnistOptError(
                f"Keras is already running on {loaded} in this process, so it cannot train on "
                f"{backend}: start it with KERAS_BACKEND={backend}, or through `mnist-opt`, "
                "which sets it before importing Keras")
        return
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        if not any(d.metadata["Name"].lower().startswith("jax-cuda")
                   for d in importlib.metadata.distributions()):
            # the CPU-only jaxlib: skip probing for CUDA, which prints an error on every start
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(jax_cache_dir()))
        # cache every compiled step, not only those over 1 s (a small MLP's are shorter)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def start_limited(threads: int):
    """Start the backend :func:`apply` chose with at most ``threads`` compute threads, as a
    worker process trains (workers, calibration): XLA's (JAX) are set before it starts,
    TensorFlow's (the input pipeline on either backend) right after its quiet import, which
    is returned."""
    if threads == 1 and os.environ.get("KERAS_BACKEND") == "jax":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
    from mnist_opt.quiet import import_tensorflow

    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf
