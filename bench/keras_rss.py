"""RSS growth per trained model, outside mnist_opt: is a memory leak ours or Keras's?

    python bench/keras_rss.py [--mode numpy|ours] [--models 12] [--subset 6000]

Builds, fits (1 epoch) and drops the same small MLP again and again with
``keras.backend.clear_session()`` and ``gc.collect()`` in between, and prints the RSS
growth per model. ``numpy`` is a bare ``model.fit`` on arrays; ``ours`` uses
``mnist_opt.training.train`` (the trial loop, without Optuna or MLflow).
"""
from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from mnist_opt import data  # noqa: E402
from mnist_opt.training.models import build_model  # noqa: E402
from mnist_opt.search.objective import rss_mb  # noqa: E402
from mnist_opt.training.loop import compile_model, train  # noqa: E402

PARAMS = {"n_layers": 4, "units_l0": 82, "units_l1": 4, "units_l2": 76, "units_l3": 12,
          "dropout_l0": 0.2, "dropout_l1": 0.2, "dropout_l2": 0.2, "dropout_l3": 0.2,
          "batch_norm": True, "activation": "relu", "optimizer": "adam",
          "learning_rate": 1e-3, "batch_size": 128, "lr_schedule": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["numpy", "ours"], default="numpy")
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--subset", type=int, default=6000)
    args = parser.parse_args()
    split = data.split(data.load("mnist"), 0.1, 48, args.subset)
    samples = []
    for _ in range(args.models):
        keras.backend.clear_session()
        model = build_model(PARAMS)
        if args.mode == "ours":
            train(model, PARAMS, (split.x_train, split.y_train), (split.x_val, split.y_val), 1)
        else:
            compile_model(model, PARAMS, len(split.y_train))
            model.fit(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val),
                      batch_size=128, epochs=1, verbose=0)
        del model
        gc.collect()
        samples.append(rss_mb())
    per_model = (samples[-1] - samples[1]) / (len(samples) - 2)  # the first model warms up TF
    print(f"{args.mode}: RSS after model 2 {samples[1]:.0f} MB, after model {len(samples)} "
          f"{samples[-1]:.0f} MB: {per_model:.1f} MB per model")


if __name__ == "__main__":
    main()
