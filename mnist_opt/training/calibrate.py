"""``mnist-opt calibrate``: how long each model family's first and later epochs take under each
Keras backend on this machine, stored for ``training.backend: auto`` (:mod:`.backend`).

Each measurement runs in its own process (Keras fixes its backend at import), with one
compute thread and the study's input pipeline, as a worker process trains a trial: the
parameter table's default model of the family, ``epochs`` epochs on MNIST's training split
(or a subset). A new calibration replaces the families it measured and keeps the others.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mnist_opt.errors import MnistOptError
from mnist_opt.training.backend import (BACKENDS, calibration_path, load_calibration,
                                        start_limited)

FAMILIES = ("mlp", "cnn")


def calibrate(families: Sequence[str] = FAMILIES, epochs: int = 3,
              train_subset: int | None = None, machine: str = "",
              path: Path | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every family × backend, write the calibration file, return its contents."""
    if epochs < 2:
        raise MnistOptError(f"--epochs must be at least 2 (a first and a later epoch), "
                            f"got {epochs}")
    path = path or calibration_path()
    doc = load_calibration(path) or {"families": {}}
    started = time.monotonic()
    for family in families:
        for backend in BACKENDS:
            echo(f"{family} on {backend}: {epochs} epochs …")
            timing = measure(family, backend, epochs, train_subset)
            doc["families"].setdefault(family, {})[backend] = timing
            echo(f"{family} on {backend}: first epoch {timing['first_s']:.2f} s, later epochs "
                 f"{timing['later_s']:.2f} s")
    doc.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine, epochs=epochs,
               train_subset=train_subset, seconds=round(time.monotonic() - started, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def measure(family: str, backend: str, epochs: int, train_subset: int | None) -> dict[str, float]:
    """One family under one backend, timed in a fresh process."""
    # KERAS_BACKEND alone, not apply(): JAX's persistent compilation cache would time a
    # recalibration's first epoch from the cache, and a new trial's model is never in it
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_opt.training.calibrate", family, str(epochs),
         *([str(train_subset)] if train_subset else [])],
        env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
    if proc.returncode:
        raise MnistOptError(f"timing {family} on {backend} failed (exit {proc.returncode}):\n"
                            f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_here(family: str, epochs: int, train_subset: int | None) -> dict[str, float]:
    """In this process, on the backend Keras imported: the first epoch's seconds (from the
    call to ``fit``: tracing or compiling included) and the mean of the later ones."""
    import keras
    import optuna

    from mnist_opt.study.config import DataConfig, StudyConfig
    from mnist_opt.study.space import suggest_params
    from mnist_opt.training.loop import fresh_model, study_split, train

    cfg = StudyConfig(name=f"calibrate_{family}", dataset="mnist", model=family, space={},
                      data=DataConfig(train_subset=train_subset))
    params = suggest_params(optuna.trial.FixedTrial({}), cfg)  # the table's defaults
    split = study_split(cfg)
    ends: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: ends.append(
        time.perf_counter()))
    start = time.perf_counter()
    train(fresh_model(params, seed=0), params, (split.x_train, split.y_train),
          (split.x_val, split.y_val), epochs, [timer])
    later = [b - a for a, b in zip(ends, ends[1:])]
    return {"first_s": round(ends[0] - start, 3), "later_s": round(sum(later) / len(later), 3),
            "n_train": len(split.y_train)}


def main(argv: list[str] | None = None) -> int:
    """``python -m mnist_opt.training.calibrate FAMILY EPOCHS [SUBSET]``: one JSON line,
    timed on ``$KERAS_BACKEND`` with one thread, as a study's worker trains."""
    args = (argv if argv is not None else sys.argv[1:])
    family, epochs = args[0], int(args[1])
    subset = int(args[2]) if len(args) > 2 else None
    start_limited(1)
    print(json.dumps(_time_here(family, epochs, subset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
